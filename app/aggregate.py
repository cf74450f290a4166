"""From the nodes' replies to the next global adapter, on the coordinator.

Members are peers who do not fully trust each other (docs/threat-model.md). So:
- every reply is checked before it counts (`RoundStrategy.check_reply`, called by app/grid.py's
  FastGrid as replies arrive): layout, dtype, length, range, counts, fingerprint, metrics. A bad one
  becomes that node dropping out of the round (under SecAgg+ its masks are reconstructed as for a
  node that died) and the node is refused for the rest of the run (`on_misbehaving`);
- weights are bounded: at most max-weight-per-org examples per organisation (app/admission.py refuses
  larger counts), and under SecAgg+ the unmasked sum of the weight factors must equal what the
  aggregated nodes declared (shared) or k x Q (private: every node weighs 1), read by
  `CheckedSecAggPlus`; otherwise the round fails, naming the nodes it could have been;
- the aggregate is checked before it becomes the global adapter: finite and within the range any
  honest round produces, in every mode, or the round fails and nothing is saved;
- aggregation="robust" sees every update, bounds each and takes a coordinate-wise trimmed mean.

What SecAgg+ cannot do: bound one member's update. Its masked vector can hold any value modulo
2**32, so a member can place the aggregate anywhere within the range check (tests/test_robust.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import ERROR
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, bytes_to_ndarray, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_secaggplus

from . import reporting, wire
from .admission import RunFailed
from .config import RunConfig
from .secagg import FIGURES, QuantizationSettings, adam_update_bound, private_sums

# What a node's fit and evaluate replies carry in plain under org-metrics="shared" (app/client_app.py):
# counts, losses (NaN is a finding, reported as one), seconds and throughput.
FIT_COUNTS = ("num_heldout", "skipped_images")
FIT_NUMBERS = ("train_loss", "heldout_loss", "fit_seconds", "train_seconds", "eval_seconds", "images_per_second")
EVAL_NUMBERS = ("heldout_loss", "eval_seconds")
# Relative slack on the update bound for float arithmetic in a mean of values within it.
_FLOAT_SLACK = 1e-6


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class RoundStrategy(Strategy):
    """Sends each stage to exactly the round's participants; turns the checked replies into the next
    global adapter. Under SecAgg+ every result carries the same already-averaged update."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.participants: list[ClientProxy] = []
        self.org_of: dict[int, str] = {}
        self.global_arrays: list[np.ndarray] = []
        self.fit: dict[str, Any] | None = None
        self.eval: dict[str, Any] | None = None
        # org-metrics="private": the final adapter is measured by a SecAgg+ fit that trains nothing.
        self.measure_only = False
        self.quant: QuantizationSettings | None = None  # this round's SecAgg+ settings (None: plain)
        # The fingerprint of the global adapter sent this round (app/model.weights_fingerprint); a node
        # that reports another trained from other weights. None: not checked (tests of other things).
        self.sent_fingerprint: str | None = None
        # The unmasked sum of this round's SecAgg+ weight factors, read by CheckedSecAggPlus.
        self.weight_total: int | None = None
        # The largest |update| entry an honest node sends: Adam's bound, also SecAgg+'s clipping range.
        self.update_bound = adam_update_bound(cfg.learning_rate, cfg.local_steps)
        # Called with (node id, reason) for a node whose reply is malformed or inconsistent: the
        # ServerApp refuses it for the rest of the run (app/admission.py's expel).
        self.on_misbehaving: Callable[[int, str], None] = lambda nid, why: None
        self.misbehaved: dict[str, str] = {}  # org -> why, this round

    def initialize_parameters(self, client_manager):
        return self.wire()

    def wire(self):
        return ndarrays_to_parameters(wire.pack(self.global_arrays))

    def unwire(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return wire.unpack(arrays, [g.shape for g in self.global_arrays])

    @property
    def size(self) -> int:
        return sum(int(g.size) for g in self.global_arrays)

    # --- each reply, before it counts ------------------------------------------------------------

    def check_reply(self, stage: str, reply: Message) -> str | None:
        """Why `reply` (of message stage `stage`) must not count, or None. A reply that does not count
        is that node misbehaving: it is reported to `on_misbehaving`. Error replies are a node declining
        or failing (its own policy, a crash): they do not count either, but are no misbehaviour."""
        if reply.has_error():
            return None
        nid = reply.metadata.src_node_id
        try:
            why = {"train": self._check_plain_fit, "collect_masked_vectors": self._check_masked_fit,
                   "evaluate": self._check_evaluate, "unmask": self._check_unmask}.get(stage, lambda r: None)(reply)
        except Exception as err:  # noqa: BLE001 - whatever a reply holds, reading it must not end the run
            why = f"its {stage} reply cannot be read ({type(err).__name__}: {err})"
        if why:
            org = self.org_of.get(nid, f"node {nid}")
            self.misbehaved[org] = why
            self.on_misbehaving(nid, why)
        return why

    def _check_fitres(self, res: FitRes, private: bool) -> str | None:
        n = res.num_examples
        if private:
            if n != 1:  # every node weighs 1 in the secure sum; its own weight travels inside the vector
                return f"declared weight {n!r}; under org-metrics=\"private\" every node declares 1"
        elif not _is_int(n) or not 1 <= n <= self._max_weight():
            return (f"declared {n!r} training examples, outside 1..{self._max_weight():g} (max-weight-per-org, and "
                    "under SecAgg+ the largest count prepared for this run)")
        metrics = res.metrics
        if self.sent_fingerprint is not None:
            got = metrics.get("received_fingerprint")
            if got is None:
                return "reported no fingerprint of the weights it trained from"
            if got != self.sent_fingerprint:
                return f"trained from weights other than the global adapter sent ({self.sent_fingerprint} sent, {got} loaded)"
        if private:
            return None
        for key in FIT_COUNTS:
            if not _is_int(metrics.get(key)) or metrics[key] < 0:
                return f"reported {key}={metrics.get(key)!r}, not a count"
        return self._check_numbers(metrics, FIT_NUMBERS)

    @staticmethod
    def _check_numbers(metrics, keys) -> str | None:
        for key in keys:
            value = metrics.get(key)
            if not _is_number(value):
                return f"reported {key}={value!r}, not a number"
            if not key.endswith("_loss") and not (math.isfinite(value) and value >= 0):
                return f"reported {key}={value!r}, not a finite non-negative number"
        return None

    def _max_weight(self) -> float:
        return min(self.cfg.max_weight_per_org, self.quant.max_weight if self.quant else math.inf)

    def _check_plain_fit(self, reply: Message) -> str | None:
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        why = self._check_fitres(res, private=False)
        if why:
            return why
        arrays = parameters_to_ndarrays(res.parameters)
        if len(arrays) != 1 or arrays[0].dtype != np.float32 or arrays[0].shape != (self.size,):
            return (f"sent arrays {[(a.dtype.name, a.shape) for a in arrays]}, not the adapter as one float32 vector "
                    f"of {self.size} values")
        worst = float(np.max(np.abs(arrays[0]))) if arrays[0].size else 0.0
        if not math.isfinite(worst):
            return "sent an update that is not finite"
        if worst > self.update_bound:
            # An honest node refuses to send one (app/client_app.py): Adam cannot move a weight further.
            return f"sent an update entry of {worst:.3g}, beyond the {self.update_bound:.3g} any round of Adam can move"
        return None

    def _check_masked_fit(self, reply: Message) -> str | None:
        private = self.cfg.org_metrics == "private"
        why = self._check_fitres(compat.recorddict_to_fitres(reply.content, keep_input=True), private)
        if why:
            return why
        masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        shapes = [(1,)] + ([] if self.measure_only else [(self.size,)]) + ([(len(FIGURES),)] if private else [])
        if not isinstance(masked, list) or not all(isinstance(b, bytes) for b in masked) or len(masked) != len(shapes):
            return f"sent a masked vector that is not {len(shapes)} arrays"
        arrays = [bytes_to_ndarray(b) for b in masked]
        if [a.shape for a in arrays] != shapes or any(a.dtype != np.int64 for a in arrays):
            return (f"sent a masked vector of {[(a.dtype.name, a.shape) for a in arrays]}, not int64 arrays of "
                    f"shapes {shapes}")
        modulus = self.quant.modulus_range
        if any(a.size and (a.min() < 0 or a.max() >= modulus) for a in arrays):
            return f"sent masked values outside [0, {modulus})"
        return None

    def _check_evaluate(self, reply: Message) -> str | None:
        res = compat.recorddict_to_evaluateres(reply.content)
        if not _is_int(res.num_examples) or res.num_examples < 0:
            return f"reported {res.num_examples!r} held-out images"
        metrics = res.metrics
        if self.sent_fingerprint is not None and metrics.get("received_fingerprint") != self.sent_fingerprint:
            return (f"measured weights other than the adapter sent ({self.sent_fingerprint} sent, "
                    f"{metrics.get('received_fingerprint')!r} loaded)")
        if metrics.get("num_heldout") != res.num_examples:
            return f"reported {metrics.get('num_heldout')!r} held-out images in its metrics, {res.num_examples} in its reply"
        return self._check_numbers(metrics, EVAL_NUMBERS)

    def _check_unmask(self, reply: Message) -> str | None:
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        nids, shares = configs.get(Key.NODE_ID_LIST), configs.get(Key.SHARE_LIST)
        if not isinstance(nids, list) or not isinstance(shares, list) or len(nids) != len(shares):
            return "sent key shares that do not pair with node ids"
        if not set(nids) <= {p.node_id for p in self.participants} or not all(isinstance(s, bytes) for s in shares):
            return "sent key shares of nodes outside this round"
        return None

    # --- the stages ------------------------------------------------------------------------------

    def configure_fit(self, server_round, parameters, client_manager):
        self.fit = None
        self.weight_total = None
        self.misbehaved = {}
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
            self._check_weight_total(server_round, by_proxy)
            # Under SecAgg+ every result carries the same unmasked aggregate; refuse one that no honest
            # round can produce before it becomes the next global adapter.
            self.quant.check_aggregate(server_round, parameters_to_ndarrays(results[0][1].parameters),
                                       {org: res.num_examples for org, res in by_proxy.items()})
        if self.cfg.org_metrics == "private":
            # Every result carries the same unmasked mean of the nodes' private vectors.
            update, federated = private_sums(
                parameters_to_ndarrays(results[0][1].parameters), len(results), clipping_range=self.update_bound,
                max_images=self.cfg.max_images_per_node, round_timeout=self.cfg.round_timeout)
            if not self.measure_only:  # a measurement trains nothing: its N is 0
                self._check_private_total(server_round, federated["num_examples"], sorted(by_proxy))
            update = self.unwire(update)
            by_org = None
            if federated["nonfinite_losses"]:
                log(ERROR, "round %d: %d non-finite loss(es) among the nodes' figures", server_round,
                    federated["nonfinite_losses"])
        else:
            by_org = {org: dict(res.metrics) | {"num_examples": res.num_examples} for org, res in by_proxy.items()}
            updates = [self.unwire(parameters_to_ndarrays(res.parameters)) for _, res in results]
            if self.cfg.aggregation == "robust":
                update = self._trimmed_mean(server_round, updates)
            else:
                update = self._weighted_mean(updates, [res.num_examples for _, res in results])
            federated = reporting.shared_figures(by_org)
        heldout = reporting.shared_heldout(by_org) if by_org else reporting.private_heldout(federated, list(by_proxy))
        if self.measure_only:
            self.eval = heldout
            return None, {}
        if self.quant and by_org is None:  # private: each node's rounding error is scaled by k*W/N
            bound = self.update_bound + self.quant.private_errors(
                len(results), self.cfg.max_images_per_node, federated["num_examples"], 1)["update"]
        elif self.quant:
            bound = self.quant.aggregate_bound([res.num_examples for res in by_proxy.values()])
        else:
            bound = self.update_bound * (1 + _FLOAT_SLACK)
        self._check_update(server_round, update, bound)
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

    def _weighted_mean(self, updates: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
        """Plain FedAvg (and SecAgg+'s already-averaged aggregate, where every update is the same)."""
        weights = [1.0] * len(counts) if self.cfg.weighting == "equal" else [float(n) for n in counts]
        total = sum(weights)  # > 0: every count was checked to be >= 1
        out = [np.zeros(g.shape, np.float64) for g in self.global_arrays]
        for arrays, w in zip(updates, weights):
            for acc, arr in zip(out, arrays):
                acc += arr.astype(np.float64) * (w / total)
        return out

    def _trimmed_mean(self, rnd: int, updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        """aggregation="robust": per coordinate, drop the robust-trim largest and smallest values and
        average the rest, unweighted (a claimed weight is itself an attack). With at most robust-trim
        misbehaving members, every coordinate lies within the range of the honest members' values."""
        trim, k = self.cfg.robust_trim, len(updates)
        if k < 2 * trim + 1:
            raise RunFailed(f"round {rnd}: aggregation=\"robust\" with robust-trim={trim} needs at least {2 * trim + 1} "
                            f"updates, got {k}: too many nodes failed this round. Nothing of it was saved; a new run "
                            "with the same output-dir resumes from the last checkpoint.")
        out = []
        for i in range(len(self.global_arrays)):
            stacked = np.sort(np.stack([u[i].astype(np.float64) for u in updates]), axis=0)
            out.append(stacked[trim:k - trim].mean(axis=0))
        return out

    def _check_weight_total(self, rnd: int, by_proxy: dict[str, FitRes]) -> None:
        """Under SecAgg+ each node masks its own weight factor, round(n/max_weight * Q), inside its vector:
        only the unmasked total is visible. It must be what the aggregated nodes declared, or a node
        weighs what it chose. The total cannot say which node it was."""
        q = self.quant
        declared = {org: round(res.num_examples / q.max_weight * q.quantization_range) for org, res in by_proxy.items()}
        expected = sum(declared.values())
        if self.weight_total == expected:
            return
        if self.weight_total is None:
            raise RunFailed(f"round {rnd}: the SecAgg+ weight total could not be read (Flower's "
                            "secaggplus_workflow.factor_extract moved?): refusing an aggregate whose weights are unchecked")
        raise RunFailed(
            f"round {rnd}: the SecAgg+ weight factors sum to {self.weight_total}, but the aggregated nodes declared "
            f"{expected} ({', '.join(f'{o}: {n.num_examples}' for o, n in sorted(by_proxy.items()))} examples at max "
            f"weight {q.max_weight:g}): one of {sorted(by_proxy)} masked a weight other than the one it reported, "
            "and SecAgg+ cannot tell which. Nothing of this round was saved; check those organisations' nodes run "
            "this app, or use aggregation=\"robust\" (docs/threat-model.md).")

    def _check_private_total(self, rnd: int, images: int, orgs: list[str]) -> None:
        """org-metrics="private": nodes weight their own vectors by n/W; the federation's N = sum n comes
        out of the same vector. k non-negative participants, each within max-images-per-node, allow
        0 < N <= k * W; a negative or zero N (a node claiming a negative count) would scale or flip
        the global update, or divide by zero."""
        k, w = len(orgs), self.cfg.max_images_per_node
        if 1 <= images <= k * w:
            return
        raise RunFailed(
            f"round {rnd}: the federation's training images unmask to {images}, outside 1..{k * w} ({k} nodes of at "
            f"most max-images-per-node={w}): one of {orgs} weighted its update by a count no node can hold (e.g. a "
            "negative one). Nothing of this round was saved.")

    def _check_update(self, rnd: int, update: list[np.ndarray], bound: float) -> None:
        """The global update about to be applied: finite, and within `bound`, what a mean of honest updates
        (each within update_bound) can reach in this mode. Never applied nor checkpointed otherwise."""
        worst = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
        if [u.shape for u in update] != [g.shape for g in self.global_arrays]:
            raise RunFailed(f"round {rnd}: the aggregate has {len(update)} arrays, not the adapter's layout. Nothing "
                            "of this round was saved.")
        if not math.isfinite(worst) or worst > bound:
            found = f"an entry of {worst:.3g}" if math.isfinite(worst) else "values that are not finite"
            raise RunFailed(f"round {rnd}: the aggregated update has {found}, beyond the {bound:.3g} a mean of updates "
                            "of one Adam round can reach. Nothing of this round was saved; a new run with the same "
                            "output-dir resumes from the last checkpoint.")

    def configure_evaluate(self, server_round, parameters, client_manager):
        self.eval = None
        self.misbehaved = {}
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


class CheckedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, which also hands the strategy the unmasked sum of the weight factors.

    Flower extracts that total (`factor_extract`) and divides by it inside `unmask_stage`, then drops
    it; the strategy needs it to check the weights (RoundStrategy._check_weight_total). Seam into
    Flower 1.41 internals, pinned by tests/test_robust.py: if it moves, the total stays None and every
    SecAgg+ round fails loudly rather than going unchecked."""

    def unmask_stage(self, grid, context, state) -> bool:
        strategy = context.strategy
        extract = flower_secaggplus.factor_extract

        def recording(parameters):
            total, rest = extract(parameters)
            strategy.weight_total = int(total)
            return total, rest

        flower_secaggplus.factor_extract = recording
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            flower_secaggplus.factor_extract = extract

