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
3 s; a timeout on every stage), which times it: metrics.jsonl records each stage's wall time.
"""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from . import metrics, reporting, wire
from .admission import Admission, RunFailed
from .config import RunConfig
from .grid import FastGrid
from .outputs import OutputDir, heldout_summary
from .secagg import QuantizationSettings, adam_update_bound, private_sums

class RoundStrategy(Strategy):
    """Sends each stage to exactly the round's participants; turns the averaged update into the
    next global adapter. Under SecAgg+ every result carries the same already-averaged update."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.participants: list[ClientProxy] = []
        self.org_of: dict[int, str] = {}
        self.global_arrays: list[np.ndarray] = []
        self.fit: dict[str, Any] | None = None
        self.eval: dict[str, Any] | None = None
        # org-metrics="private": the final adapter is measured by a SecAgg+ fit that trains nothing.
        self.measure_only = False
        self.quant: QuantizationSettings | None = None  # this round's SecAgg+ settings (None: plain FedAvg)

    def initialize_parameters(self, client_manager):
        return self.wire()

    def wire(self):
        return ndarrays_to_parameters(wire.pack(self.global_arrays))

    def unwire(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return wire.unpack(arrays, [g.shape for g in self.global_arrays])

    def configure_fit(self, server_round, parameters, client_manager):
        self.fit = None
        if self.measure_only:
            self.eval = None
        config = ({"server-round": server_round} | wire.shapes_config(self.global_arrays)
                  | ({"measure-only": True} if self.measure_only else {}))
        if self.quant:
            # Each node checks its example count against it before masking (client_app.secagg_when_asked).
            config["max-weight"] = self.quant.max_weight
        ins = FitIns(parameters, config)
        return [(proxy, ins) for proxy in self.participants]

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        for failure in failures:
            log(ERROR, "round %d: a node failed: %s", server_round, getattr(failure, "status", failure))
        if not results:
            return None, {}
        by_proxy = {self.org_of[proxy.node_id]: res for proxy, res in results}
        if self.quant:
            # Under SecAgg+ every result carries the same unmasked aggregate; refuse one that no honest
            # round can produce before it becomes the next global adapter.
            self.quant.check_aggregate(server_round, parameters_to_ndarrays(results[0][1].parameters),
                                       {org: res.num_examples for org, res in by_proxy.items()})
        if self.cfg.org_metrics == "private":
            # Every result carries the same unmasked mean of the nodes' private vectors.
            update, federated = private_sums(
                parameters_to_ndarrays(results[0][1].parameters), len(results),
                clipping_range=adam_update_bound(self.cfg.learning_rate, self.cfg.local_steps), max_images=self.cfg.max_images_per_node,
                round_timeout=self.cfg.round_timeout)
            update = self.unwire(update)
            by_org = None
            if federated["nonfinite_losses"]:
                log(ERROR, "round %d: %d non-finite loss(es) among the nodes' figures", server_round,
                    federated["nonfinite_losses"])
        else:
            by_org = {org: dict(res.metrics) | {"num_examples": res.num_examples} for org, res in by_proxy.items()}
            total = sum(res.num_examples for _, res in results)
            update = [np.zeros(g.shape, np.float64) for g in self.global_arrays]
            for _, res in results:
                for acc, arr in zip(update, self.unwire(parameters_to_ndarrays(res.parameters))):
                    acc += arr.astype(np.float64) * (res.num_examples / total)
            federated = reporting.shared_figures(by_org)
        heldout = reporting.shared_heldout(by_org) if by_org else reporting.private_heldout(federated, list(by_proxy))
        if self.measure_only:
            self.eval = heldout
            return None, {}
        self.global_arrays = [(g + u).astype(np.float32) for g, u in zip(self.global_arrays, update)]
        self.fit = {
            "orgs": sorted(by_proxy),
            "update_norm": float(np.sqrt(sum(float(np.sum(u * u)) for u in update))),
            "fingerprints": {org: str(res.metrics["received_fingerprint"]) for org, res in by_proxy.items()},
            "federated": federated,
            "by_org": by_org,
            "heldout": heldout,
        }
        return self.wire(), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        self.eval = None
        ins = EvaluateIns(parameters, {"server-round": server_round} | wire.shapes_config(self.global_arrays))
        return [(proxy, ins) for proxy in self.participants]

    def aggregate_evaluate(self, server_round, results: list[tuple[ClientProxy, EvaluateRes]], failures):
        for failure in failures:
            log(ERROR, "round %d: evaluation failed on a node: %s", server_round, getattr(failure, "status", failure))
        if not results:
            return None, {}
        self.eval = reporting.shared_heldout({self.org_of[p.node_id]: dict(res.metrics) | {"num_heldout": res.num_examples}
                                              for p, res in results})
        return self.eval["heldout_loss"], {}

    def evaluate(self, server_round, parameters):
        return None


class Federation:
    def __init__(self, grid: Grid, context: Context, cfg: RunConfig, simulated: bool = False) -> None:
        self.cfg = cfg
        self.grid = FastGrid(grid, cfg.round_timeout)
        self.out = OutputDir(cfg.output_dir)
        self.strategy = RoundStrategy(cfg)
        self.clients = SimpleClientManager()
        self.legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds),
                                    strategy=self.strategy, client_manager=self.clients)
        self.round_cfg = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = self.round_cfg
        self.admission = Admission(self.grid, self.clients, cfg, self.strategy.org_of, simulated)
        self.quant: QuantizationSettings | None = None  # this round's SecAgg+ settings
        self.secagg = SecAggPlusWorkflow(
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
        self.names = net.names
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
            self._checkpoint(0, record, sampler, samples_now=sampler is not None)

        for rnd in range(start + 1, cfg.num_rounds + 1):
            t_round = time.perf_counter()
            self.round_cfg[Key.CURRENT_ROUND] = rnd
            metrics.server().round_current.set(rnd)
            self.strategy.participants = self.admission.participants(rnd)
            prepare_seconds = time.perf_counter() - t_round
            sent = model.weights_fingerprint(self.strategy.global_arrays)
            quant = self._configure_secagg()
            log(INFO, "[ROUND %d/%d] %s over %s", rnd, cfg.num_rounds, cfg.aggregation,
                ", ".join(sorted(self.strategy.org_of[p.node_id] for p in self.strategy.participants)))
            t0 = time.perf_counter()
            (self.secagg or default_fit_workflow)(self.grid, self.legacy)
            fit_seconds = time.perf_counter() - t0
            stages = self.grid.take_stages()
            if self.strategy.fit is None:
                raise RunFailed(
                    f"round {rnd} did not aggregate ({cfg.aggregation}): not enough nodes completed it. "
                    "The SuperNode logs name the failing node; the last good adapter is in "
                    f"{self.out.round_dir(rnd - 1)} and a new run with the same output-dir resumes there."
                )
            self._check_received(rnd, sent, self.strategy.fit["fingerprints"])
            # Nodes measured the adapter they received, i.e. the previous round's result.
            self._record_heldout(rnd - 1, self.strategy.fit["heldout"])
            record = self._round_metrics(rnd, {"prepare": prepare_seconds, "fit": fit_seconds, "stages": stages})
            record["global_sent_fingerprint"] = sent
            record["quantization"] = quant
            due = sampler is not None and (rnd % cfg.sample_every == 0 or rnd == cfg.num_rounds)
            self._checkpoint(rnd, record, sampler, samples_now=due, round_started=t_round)
            self._export_round(record)

        last = max(start, cfg.num_rounds)
        measured = self.out.round_metrics(last)
        if measured.get("heldout_loss") is None and not measured.get("heldout_withheld"):
            # No later fit measures the last adapter: one evaluate stage does.
            self.round_cfg[Key.CURRENT_ROUND] = last
            self.strategy.participants = self.admission.participants(last)
            t0 = time.perf_counter()
            if cfg.org_metrics == "private":
                # An evaluate reply would carry each node's loss in plain: measure inside SecAgg+.
                self.strategy.measure_only = True
                self._configure_secagg()
                try:
                    self.secagg(self.grid, self.legacy)
                finally:
                    self.strategy.measure_only = False
            else:
                default_evaluate_workflow(self.grid, self.legacy)
            if self.strategy.eval is None:
                raise RunFailed(f"no node could evaluate the final adapter of round {last}; see the SuperNode logs")
            timing = reporting.final_evaluate_record(time.perf_counter() - t0, self.grid.take_stages(), self.strategy.eval)
            self._record_heldout(last, self.strategy.eval, timing)
        final = self.out.write_final(last)
        log(INFO, "held-out loss by round: %s", heldout_summary(self.out.history()))
        log(INFO, "final adapter: %s", final)

    def _export_round(self, record: dict[str, Any]) -> None:
        size = sum(a.size for a in self.strategy.global_arrays)
        reporting.export_round(record, online=len(list(self.grid.get_node_ids())),
                               received_bytes=len(record["aggregated"]) * metrics.update_bytes(size, self.secagg is not None))

    def _record_heldout(self, rnd: int, heldout: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        heldout = reporting.private_heldout_record(rnd, heldout, self.out.history())
        reporting.export_heldout(heldout)
        self.out.update_round_metrics(rnd, heldout | ({"final_evaluate": final} if final else {}))
        log(INFO, *reporting.heldout_log_line(rnd, heldout))

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

    def _check_received(self, rnd: int, sent: str, fingerprints: dict[str, str]) -> None:
        wrong = {org: fp for org, fp in fingerprints.items() if fp != sent}
        if wrong:
            raise RunFailed(f"round {rnd}: {sorted(wrong)} trained from weights other than the global adapter "
                            f"sent ({sent} sent, {wrong} loaded)")

    def _round_metrics(self, rnd: int, seconds: dict[str, float]) -> dict[str, Any]:
        fit = self.strategy.fit
        record = reporting.round_record(
            rnd, self.cfg.aggregation, self.cfg.org_metrics,
            sorted(self.strategy.org_of[p.node_id] for p in self.strategy.participants), fit, seconds)
        if self.cfg.org_metrics == "private":
            # Worst-case errors of this round's federated figures (app/secagg.py, private_errors).
            record["private_errors"] = self.quant.private_errors(
                len(fit["orgs"]), self.cfg.max_images_per_node, record["num_examples"], fit["heldout"]["num_heldout"])
            record = reporting.private_round(record, self.out.history())
        return record

    def _checkpoint(self, rnd, metrics, sampler, samples_now: bool, round_started: float | None = None) -> None:
        t0 = time.perf_counter()
        samples = sampler.grid(self.strategy.global_arrays if rnd else None) if samples_now else None
        metrics["seconds"]["samples"] = time.perf_counter() - t0
        if round_started is not None:
            metrics["seconds"]["round"] = time.perf_counter() - round_started
        adapter = dict(zip(self.names, self.strategy.global_arrays))
        path = self.out.write_round(rnd, metrics, adapter, samples)
        log(INFO, "round %d saved to %s%s", rnd, path,
            f" (train loss {metrics['train_loss']:.5f})" if "train_loss" in metrics else "")


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
