"""The ServerApp: FedAvg of LoRA updates through SecAgg+, with checkpoints and resume.

Flower's DefaultWorkflow runs rounds 1..N blind: it cannot resume, it waits 24 h for missing
nodes, and a round SecAgg+ could not aggregate is only logged while the run ends "completed".
So this loop drives Flower's own per-round workflows itself:

    prepare   every admitted node (app/admission.py: organisation from its key's registration)
              encodes its data once and reports its example count (none under
              org-metrics="private", where nodes' figures only travel inside the SecAgg+ vector)
    round 0   the initial adapter (equal to the base model) and samples of it
    round r   fit (SecAgg+ or plain FedAvg): each node first measures the held-out loss of the
              adapter it received (round r-1's), then trains; the round must aggregate, or the
              run fails; checkpoint adapter + metrics + samples; a restart resumes after it
    end       one evaluate stage measures the last adapter, which no later fit receives (under
              org-metrics="private": a SecAgg+ fit that only measures, so losses stay masked)

Every message stage goes through app/grid.py's FastGrid (replies pulled every 0.1 s, not Flower's
3 s; a timeout on every stage), which times it: metrics.jsonl records each stage's wall time, and
which has every reply checked as it arrives (app/aggregate.py). This module is the round loop; how
replies become the global adapter is app/aggregate.py, what is kept of a round app/checkpoint.py.
A node whose reply is malformed or inconsistent is refused for the rest of the run (app/admission.py's
expel), like a node that went away; the run fails only when fewer than min-nodes remain.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from . import metrics, reporting
from .admission import Admission, RunFailed
from .aggregate import CheckedSecAggPlus, RoundStrategy
from .checkpoint import Recorder
from .config import RunConfig
from .grid import FastGrid
from .outputs import OutputDir, heldout_summary
from .secagg import QuantizationSettings


class Federation:
    def __init__(self, grid: Grid, context: Context, cfg: RunConfig, simulated: bool = False) -> None:
        self.cfg = cfg
        self.strategy = RoundStrategy(cfg)
        self.grid = FastGrid(grid, cfg.round_timeout, check=self.strategy.check_reply)
        self.out = OutputDir(cfg.output_dir)
        self.recorder = Recorder(cfg, self.out)
        self.clients = SimpleClientManager()
        self.legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds),
                                    strategy=self.strategy, client_manager=self.clients)
        self.round_cfg = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = self.round_cfg
        self.admission = Admission(self.grid, self.clients, cfg, self.strategy.org_of, simulated)
        self.strategy.on_misbehaving = self.admission.expel
        self.quant: QuantizationSettings | None = None  # this round's SecAgg+ settings
        self.secagg = CheckedSecAggPlus(
            # Every participant holds a share of every other's key; any 2/3 of them can unmask
            # the sum when a node drops out mid-round.
            num_shares=1.0, reconstruction_threshold=0.67, timeout=cfg.round_timeout,
        ) if cfg.aggregation == "secagg+" else None

    # --- rounds ------------------------------------------------------------------------------

    def run(self) -> None:
        gauges = metrics.server()
        gauges.run_active.set(1)
        try:
            self._run()
        finally:
            gauges.run_active.set(0)
            self.out.release()

    def _run(self) -> None:
        cfg = self.cfg
        from . import model  # torch on the server only for the initial adapter and samples

        self.out.claim(cfg.model_identity)
        net = model.LoraUNet.load(cfg)
        self.recorder.names = net.names
        sampler = model.Sampler(cfg, net) if cfg.sample_every else None
        checkpoint = self.out.last_checkpoint()
        if checkpoint:
            start, arrays = checkpoint
            if list(arrays) != net.names:
                raise RunFailed(f"checkpoint round {start} in {self.out.rounds} does not match the model's LoRA layers")
            self.strategy.global_arrays = list(arrays.values())
            log(INFO, "resuming after round %d from %s", start, self.out.round_dir(start))
        else:
            start = 0
            self.strategy.global_arrays = list(model.lora_state(net.unet).values())
        if start >= cfg.num_rounds:
            log(INFO, "all %d rounds are already in %s: nothing to train", cfg.num_rounds, self.out.root)
        self._set_global()

        if start == 0:
            record = {"round": 0, "aggregation": cfg.aggregation, "heldout_loss": None, "seconds": {}}
            self.recorder.checkpoint(0, record, self.strategy.global_arrays, sampler, samples_now=sampler is not None)

        for rnd in range(start + 1, cfg.num_rounds + 1):
            t_round = time.perf_counter()
            self.round_cfg[Key.CURRENT_ROUND] = rnd
            metrics.server().round_current.set(rnd)
            sent = self.strategy.sent_fingerprint = model.weights_fingerprint(self.strategy.global_arrays)
            while True:
                t_prepare = time.perf_counter()
                self.strategy.participants = self.admission.participants(rnd)
                prepare_seconds = time.perf_counter() - t_prepare
                quant = self._configure_secagg()
                participants = sorted(self.strategy.org_of[p.node_id] for p in self.strategy.participants)
                log(INFO, "[ROUND %d/%d] %s over %s", rnd, cfg.num_rounds, cfg.aggregation, ", ".join(participants))
                t0 = time.perf_counter()
                self._workflow(rnd, self.secagg or default_fit_workflow)
                fit_seconds = time.perf_counter() - t0
                stages = self.grid.take_stages()
                if self.strategy.fit is not None or not self.strategy.misbehaved:
                    break
                # Refused nodes can leave too few for SecAgg+ to unmask (or for the trimmed mean): the
                # round is run again without them; participants() fails the run below min-nodes.
                log(WARNING, "round %d did not aggregate after refusing %s: running it again without them", rnd,
                    self._misbehaved())
            if self.strategy.fit is None:
                raise RunFailed(
                    f"round {rnd} did not aggregate ({cfg.aggregation}): not enough nodes completed it"
                    + (f" (refused: {self._misbehaved()})" if self.strategy.misbehaved else "")
                    + ". The SuperNode logs name the failing node; the last good adapter is in "
                    f"{self.out.round_dir(rnd - 1)} and a new run with the same output-dir resumes there."
                )
            # Nodes measured the adapter they received, i.e. the previous round's result.
            self.recorder.record_heldout(rnd - 1, self.strategy.fit["heldout"])
            record = self.recorder.round_record(
                rnd, participants, self.strategy.fit, {"prepare": prepare_seconds, "fit": fit_seconds, "stages": stages},
                self.quant, self.admission.refused_orgs())
            record["global_sent_fingerprint"] = sent
            record["quantization"] = quant
            due = sampler is not None and (rnd % cfg.sample_every == 0 or rnd == cfg.num_rounds)
            self.recorder.checkpoint(rnd, record, self.strategy.global_arrays, sampler, samples_now=due,
                                     round_started=t_round)
            self.recorder.export_round(record, self.strategy.global_arrays, online=len(list(self.grid.get_node_ids())))

        last = max(start, cfg.num_rounds)
        measured = self.out.round_metrics(last)
        if measured.get("heldout_loss") is None and not measured.get("heldout_withheld"):
            # No later fit measures the last adapter: one evaluate stage does.
            self.round_cfg[Key.CURRENT_ROUND] = last
            self.strategy.participants = self.admission.participants(last)
            self.strategy.sent_fingerprint = model.weights_fingerprint(self.strategy.global_arrays)
            t0 = time.perf_counter()
            if cfg.org_metrics == "private":
                # An evaluate reply would carry each node's loss in plain: measure inside SecAgg+.
                self.strategy.measure_only = True
                self._configure_secagg()
                try:
                    self._workflow(last, self.secagg)
                finally:
                    self.strategy.measure_only = False
            else:
                self._workflow(last, default_evaluate_workflow)
            if self.strategy.eval is None:
                raise RunFailed(f"no node could evaluate the final adapter of round {last}; see the SuperNode logs"
                                + (f" (refused: {self._misbehaved()})" if self.strategy.misbehaved else ""))
            timing = reporting.final_evaluate_record(time.perf_counter() - t0, self.grid.take_stages(), self.strategy.eval)
            self.recorder.record_heldout(last, self.strategy.eval, timing)
        final = self.out.write_final(last)
        log(INFO, "held-out loss by round: %s", heldout_summary(self.out.history()))
        log(INFO, "final adapter: %s", final)

    def _workflow(self, rnd: int, workflow) -> None:
        """Run one of Flower's workflows for this round. An exception inside it is a round that cannot
        produce a correct result: under SecAgg+, e.g., bad key shares at unmasking, which cannot be
        traced to one node. It fails the round (and the run) loudly, with nothing saved."""
        try:
            workflow(self.grid, self.legacy)
        except RunFailed:
            raise
        except Exception as err:
            raise RunFailed(
                f"round {rnd}: {self.cfg.aggregation} failed inside Flower's workflow ({type(err).__name__}: {err}). "
                "A participant sent data the protocol cannot use; under SecAgg+ it cannot be told which. Nothing of "
                f"this round was saved; a new run with the same output-dir resumes from the last checkpoint.") from err

    def _misbehaved(self) -> str:
        return "; ".join(f"{org}: {why}" for org, why in sorted(self.strategy.misbehaved.items()))

    def _set_global(self) -> None:
        params = self.strategy.wire()
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)

    def _configure_secagg(self) -> dict[str, float] | None:
        if not self.secagg:
            return None
        if self.cfg.org_metrics == "private":
            # No counts: every node joins with weight 1 and weights its own vector (app/secagg.py).
            k = len(self.strategy.participants)
            q = QuantizationSettings.private(self.cfg.learning_rate, self.cfg.local_steps, k)
            if q.private_errors(k, self.cfg.max_images_per_node, 1, 1)["images"] >= 0.5:
                raise RunFailed(f"max-images-per-node={self.cfg.max_images_per_node} is too large for {k} nodes: "
                                "federated image counts would no longer be exact. Lower it.")
        else:
            # Each count is at most max-weight-per-org (app/admission.py refuses larger ones).
            counts = [self.admission.counts[p.node_id] for p in self.strategy.participants]
            q = QuantizationSettings.for_round(self.cfg.learning_rate, self.cfg.local_steps, counts)
        # The workflow reads these at the start of each round's setup stage.
        self.secagg.clipping_range = q.clipping_range
        self.secagg.max_weight = q.max_weight
        self.secagg.quantization_range = q.quantization_range
        self.secagg.modulus_range = q.modulus_range
        log(INFO, "SecAgg+ quantization: clipping range %.3g, max weight %d, %d levels (step %.2g)",
            q.clipping_range, q.max_weight, q.quantization_range, q.step)
        self.quant = self.strategy.quant = q
        return {"clipping_range": q.clipping_range, "max_weight": q.max_weight,
                "quantization_range": q.quantization_range, "step": q.step}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    # Flower's Simulation Engine hands the ServerApp its in-process grid; a deployment's ServerApp
    # always gets one to a SuperLink. No run setting can turn a deployment into a "simulation".
    simulated = isinstance(grid, InMemoryGrid)
    if simulated:
        log(WARNING, "Flower Simulation Engine: for trying and developing on one machine, not for deploying. "
            "No TLS, no node authentication: simulated node N is org-N and reads %s",
            Path(cfg.sim_data_dir).resolve() / "org-N")
    Federation(grid, context, cfg, simulated).run()
