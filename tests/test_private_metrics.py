"""org-metrics="private": the coordinator learns federation-wide figures only, and exactly enough.

Two levels: the vector encoding through Flower's own quantization arithmetic (every value in range,
federated figures within the stated precision, out-of-bound values refused); then the real SecAgg+
protocol in this process, Flower's server workflow talking to the app's real mods over real
Messages, checking every reply that would reach the coordinator. Only the training itself is
replaced by fixed numbers (the loopback federation test runs the real one).
"""

from __future__ import annotations

import copy
import math
import re
import uuid

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.common import ConfigRecord, GetPropertiesIns
from flwr.common.constant import ErrorCode, MessageTypeLegacy
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.compat.common import recorddict_compat as compat

from app import wire
from app.client_app import MODS, PUBLIC_FIT_METRICS
from app.config import RunConfig
from app.grid import FastGrid
from app.secagg import (LOSS_BOUND, PrivateBoundError, QuantizationSettings, adam_update_bound, private_sums,
                        private_vector)
from app.aggregate import CheckedSecAggPlus, RoundStrategy
from conftest import with_defaults
from leaks import log_leaks, record_leaks
from test_secagg import _secagg_aggregate, _updates

LR, STEPS, W, TIMEOUT = 1e-4, 50, 10_000, 1800.0
C = adam_update_bound(LR, STEPS)


def _nodes(k: int, seed: int) -> list[dict]:
    """Unequal organisations: image counts over two orders of magnitude, losses in the usual range."""
    rng = np.random.default_rng(seed)
    nodes = []
    for _ in range(k):
        n = int(rng.integers(3, 3000))
        nodes.append({"n": n, "report": {
            "org": "o", "num_heldout": max(1, n // 9), "skipped_images": int(rng.integers(0, 5)),
            "train_loss": float(rng.uniform(0.05, 1.5)), "heldout_loss": float(rng.uniform(0.05, 1.5)),
            "fit_seconds": float(rng.uniform(1, 600)), "train_seconds": float(rng.uniform(1, 500)),
            "eval_seconds": float(rng.uniform(1, 50)), "images_per_second": float(rng.uniform(1, 99)),
            "received_fingerprint": "abc"}})
    return nodes


def _exact(nodes: list[dict], updates: list[list[np.ndarray]]) -> dict:
    n = [x["n"] for x in nodes]
    h = [x["report"]["num_heldout"] for x in nodes]
    return {
        "num_examples": sum(n), "num_heldout": sum(h),
        "skipped_images": sum(x["report"]["skipped_images"] for x in nodes),
        "train_loss": sum(x["report"]["train_loss"] * x["n"] for x in nodes) / sum(n),
        "heldout_loss": sum(x["report"]["heldout_loss"] * hi for x, hi in zip(nodes, h)) / sum(h),
        "fit_seconds_mean": sum(x["report"]["fit_seconds"] for x in nodes) / len(nodes),
        "update": [sum(ni * u[i].astype(np.float64) for u, ni in zip(updates, n)) / sum(n)
                   for i in range(len(updates[0]))],
    }


def _encode(nodes, updates):
    return [private_vector(u, x["n"], x["report"], clipping_range=C, max_images=W, round_timeout=TIMEOUT)
            for x, u in zip(nodes, updates)]


def _decode(mean, k):
    return private_sums(mean, k, clipping_range=C, max_images=W, round_timeout=TIMEOUT)


@pytest.mark.parametrize("k", [3, 5, 17])
def test_federated_figures_through_flower_quantization(k):
    nodes = _nodes(k, seed=k)
    # The extremes the bounds allow: a node with exactly W images and the largest loss sendable.
    nodes[0] = {"n": W - 12, "report": nodes[0]["report"] | {"num_heldout": 10, "skipped_images": 2,
                                                               "train_loss": LOSS_BOUND, "heldout_loss": LOSS_BOUND}}
    updates = _updates(k, LR, STEPS, seed=k)
    updates[0][0][0, 0] = C / 1.01  # an update entry at the analytic bound
    vectors = _encode(nodes, updates)
    assert max(float(np.max(np.abs(a))) for v in vectors for a in v) <= C, "a value would be clipped"

    q = QuantizationSettings.private(LR, STEPS, k)
    update, got = _decode(_secagg_aggregate(vectors, [1] * k, q), k)
    want = _exact(nodes, updates)
    errors = q.private_errors(k, W, want["num_examples"], want["num_heldout"])
    assert errors["images"] < 0.5  # so the totals below are exact integers
    for key in ("num_examples", "num_heldout", "skipped_images"):
        assert got[key] == want[key], key
    assert abs(got["train_loss"] - want["train_loss"]) <= errors["train_loss"]
    assert abs(got["heldout_loss"] - want["heldout_loss"]) <= errors["heldout_loss"]
    assert abs(got["fit_seconds_mean"] - want["fit_seconds_mean"]) < 1e-3
    err = max(float(np.max(np.abs(g - w))) for g, w in zip(update, want["update"]))
    assert err <= errors["update"] and err < 1e-8, err  # the aggregate itself: as good as shared mode's 1e-8
    assert got["nonfinite_losses"] == 0


def test_stated_precision_for_the_default_bound():
    """The figures README states: 3 nodes, max-images-per-node=10000, default lr/steps."""
    q = QuantizationSettings.private(LR, STEPS, 3)
    e = q.private_errors(3, W, num_examples=1000, num_heldout=100)
    assert e["images"] < 6e-5
    assert e["heldout_loss"] < 6e-6 and e["train_loss"] < 6e-7
    # The loopback test's tiny data: 3 x 12 train, 3 x 4 held-out images.
    e = q.private_errors(3, W, num_examples=36, num_heldout=12)
    assert e["heldout_loss"] < 5e-5 and e["train_loss"] < 2e-5


def test_a_nonfinite_loss_makes_the_federated_loss_nan():
    nodes = _nodes(3, seed=1)
    nodes[1]["report"]["heldout_loss"] = float("inf")
    updates = _updates(3, LR, STEPS)
    q = QuantizationSettings.private(LR, STEPS, 3)
    _, got = _decode(_secagg_aggregate(_encode(nodes, updates), [1] * 3, q), 3)
    assert math.isnan(got["heldout_loss"]) and math.isfinite(got["train_loss"]) and got["nonfinite_losses"] == 1


@pytest.mark.parametrize("change,message", [
    ({"num_heldout": W}, "max-images-per-node=10000"),
    ({"train_loss": LOSS_BOUND * 1.01}, r"train loss is outside \[0, 10\]"),
    ({"heldout_loss": -0.5}, r"held-out loss is outside|heldout loss is outside"),
    ({"fit_seconds": TIMEOUT + 1}, "round-timeout"),
])
def test_a_node_refuses_values_outside_the_bounds(change, message):
    report = _nodes(1, seed=2)[0]["report"] | change
    with pytest.raises(PrivateBoundError, match=message) as err:
        private_vector([np.zeros(3, np.float32)], 100, report, clipping_range=C, max_images=W, round_timeout=TIMEOUT)
    # The refusal reaches the coordinator: it names the bound, never the node's value.
    for value in change.values():
        assert f"{value:g}" not in str(err.value).replace("10000", "").replace(f"{TIMEOUT:g}", "")


# --- the real protocol, in process ---------------------------------------------------------------

class InProcessGrid:
    """Flower's Grid contract (what the SecAgg+ workflow calls), delivering each message straight to
    a ClientApp with one Context per node, as a SuperNode would. `replies` keeps everything that
    would reach the coordinator."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context]) -> None:
        self.app, self.contexts, self.replies = app, contexts, []
        self.ready: dict[str, Message] = {}  # pushed message id -> its reply, until pulled

    def get_node_ids(self):
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        msg = copy.deepcopy(msg)  # each node gets its own copy, as over the wire (mods mutate it)
        try:
            reply = self.app(message=msg, context=self.contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # what a SuperNode sends back when the ClientApp raises
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(ex)), reply_to=msg)
        self.replies.append(reply)
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        return [self._deliver(msg) for msg in messages]

    # The Grid's lower-level pair (app/grid.py's FastGrid uses it): every reply is ready at once.
    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex  # as Flower's grids set it
            self.ready[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(mid) for mid in list(message_ids) if mid in self.ready]


class FixedClient(NumPyClient):
    """Stands in for training only: returns a fixed update and report, as LoraClient.fit does."""

    def __init__(self, node: dict, update: list[np.ndarray]) -> None:
        self.node, self.update = node, update

    def fit(self, parameters, config):
        if self.node.get("drops"):  # a node that goes away in the fit stage, after the key exchange
            raise ConnectionError("node went offline mid-round")
        if config.get("measure-only"):
            return [], 0, self.node["report"]
        return wire.pack(self.update), self.node["n"], self.node["report"]


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """What a ServerApp process has set when Flower's workflow creates its messages."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _run_secagg(run_config: dict, nodes: list[dict], updates, measure_only: bool = False, node_config: dict | None = None,
                org_prefix: str = "org", prepared: list[int] | None = None, mods: list | None = None,
                wrap_grid=None, sent_fingerprint: str | None = None):
    """One SecAgg+ round in process, as the ServerApp runs it (its strategy, its SecAgg+ workflow, its
    FastGrid checking every reply). `prepared`: the counts the coordinator prepared with (default: the
    nodes' current ones); `mods`: the ClientApp's mods (default: the app's own); `wrap_grid`: what the
    workflow gets instead of the grid (default: the ServerApp's FastGrid with the strategy's check)."""
    cfg = RunConfig.from_flower(with_defaults(run_config))
    ids = list(range(101, 101 + len(nodes)))
    by_id = dict(zip(ids, zip(nodes, updates)))
    app = ClientApp(client_fn=lambda ctx: FixedClient(*by_id[ctx.node_id]).to_client(),
                    mods=MODS if mods is None else mods)
    contexts = {nid: Context(run_id=1, node_id=nid, node_config={"data-dir": "/d", "org": f"{org_prefix}-{nid}"} | (node_config or {}),
                             state=RecordDict(), run_config=with_defaults(run_config)) for nid in ids}
    grid = InProcessGrid(app, contexts)
    strategy = RoundStrategy(cfg)
    strategy.global_arrays = [np.zeros_like(a) for a in updates[0]]
    strategy.measure_only = measure_only
    strategy.sent_fingerprint = sent_fingerprint
    clients = SimpleClientManager()
    for nid in ids:
        proxy = GridClientProxy(node_id=nid, grid=grid, run_id=1)
        clients.register(proxy)
        strategy.participants.append(proxy)
        strategy.org_of[nid] = f"{org_prefix}-{nid}"
    legacy = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=clients)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.START_TIME: 0.0, Key.CURRENT_ROUND: 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(strategy.wire(), True)
    q = (QuantizationSettings.private(cfg.learning_rate, cfg.local_steps, len(nodes)) if cfg.org_metrics == "private"
         else QuantizationSettings.for_round(cfg.learning_rate, cfg.local_steps, prepared or [x["n"] for x in nodes]))
    strategy.quant = q  # what Federation._configure_secagg sets for the round
    if wrap_grid is None:
        def wrap_grid(inner):
            return FastGrid(inner, 60.0, poll_seconds=0.0, check=strategy.check_reply)
    CheckedSecAggPlus(num_shares=1.0, reconstruction_threshold=0.67, max_weight=q.max_weight,
                      clipping_range=q.clipping_range, quantization_range=q.quantization_range,
                      modulus_range=q.modulus_range)(wrap_grid(grid), legacy)
    return strategy, grid.replies


def _plain_values(reply: Message) -> list:
    """Every scalar a reply carries outside the masked vector (config and metric records)."""
    out = []
    for record in [*reply.content.config_records.values(), *reply.content.metric_records.values()]:
        for key, value in record.items():
            if key != "masked_parameters":  # the masked vector itself: uniform noise mod 2**32
                out.extend(value if isinstance(value, list) else [value])
    return out


PRIVATE = {"org-metrics": "private", "learning-rate": LR, "local-steps": STEPS, "max-images-per-node": W}


def _figures(nodes: list[dict]) -> set:
    return {v for x in nodes for v in [x["n"], *(x["report"][k] for k in (
        "num_heldout", "skipped_images", "train_loss", "heldout_loss", "fit_seconds", "train_seconds", "eval_seconds",
        "images_per_second"))] if v not in (0, 1)}


def test_private_round_reveals_only_federated_figures():
    nodes = _nodes(3, seed=7)
    updates = _updates(3, LR, STEPS, seed=7)
    strategy, replies = _run_secagg(PRIVATE, nodes, updates)
    assert strategy.fit is not None, [r.error.reason for r in replies if r.has_error()]
    # No reply, in any of the four stages, carries a node's figure in plain.
    assert len(replies) == 4 * 3 and not any(r.has_error() for r in replies)
    for reply in replies:
        leaked = _figures(nodes) & set(_plain_values(reply))
        assert not leaked, (reply.content, leaked)
    # What the strategy receives from Flower: the fingerprint, weight 1, nothing else.
    masked = [r for r in replies if "fitres.metrics" in r.content.config_records]
    assert len(masked) == 3
    for reply in masked:
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        assert set(res.metrics) == set(PUBLIC_FIT_METRICS) and res.num_examples == 1
    # ...and yet the federated figures come out, within the stated precision.
    want = _exact(nodes, updates)
    fed = strategy.fit["federated"]
    q = QuantizationSettings.private(LR, STEPS, 3)
    errors = q.private_errors(3, W, want["num_examples"], want["num_heldout"])
    assert fed["num_examples"] == want["num_examples"] and fed["num_heldout"] == want["num_heldout"]
    assert abs(fed["train_loss"] - want["train_loss"]) <= errors["train_loss"]
    assert abs(strategy.fit["heldout"]["heldout_loss"] - want["heldout_loss"]) <= errors["heldout_loss"]
    assert strategy.fit["by_org"] is None
    assert set(strategy.fit["heldout"]) == {"heldout_loss", "num_heldout", "heldout_orgs"}  # orgs: participation
    err = max(float(np.max(np.abs(g - w))) for g, w in zip(strategy.global_arrays, want["update"]))
    assert err < 1e-7, err  # float32 global weights


def test_private_final_measurement_is_a_masked_fit():
    nodes = _nodes(3, seed=8)
    strategy, replies = _run_secagg(PRIVATE, nodes, _updates(3, LR, STEPS, seed=8), measure_only=True)
    assert strategy.fit is None and strategy.eval is not None
    for reply in replies:
        assert not _figures(nodes) & set(_plain_values(reply))
    want = _exact(nodes, _updates(3, LR, STEPS, seed=8))
    assert strategy.eval["num_heldout"] == want["num_heldout"]
    assert abs(strategy.eval["heldout_loss"] - want["heldout_loss"]) < 1e-5
    assert not np.any(np.concatenate([a.ravel() for a in strategy.global_arrays]))  # nothing was trained


def test_shared_round_does_reveal_them():
    """The control: the same check sees every organisation's figures when they are shared."""
    nodes = _nodes(3, seed=7)
    _, replies = _run_secagg({"learning-rate": LR, "local-steps": STEPS}, nodes, _updates(3, LR, STEPS, seed=7))
    seen = set().union(*(set(_plain_values(r)) for r in replies))
    assert _figures(nodes) <= seen


def test_share_metrics_false_refuses_a_revealing_run():
    from app.client_app import app

    msg = Message(content=compat.getpropertiesins_to_recorddict(GetPropertiesIns({})), dst_node_id=5,
                  message_type=MessageTypeLegacy.GET_PROPERTIES)
    ctx = Context(run_id=1, node_id=5, node_config={"data-dir": "/nonexistent", "org": "clinic-a",
                                                   "share-metrics": False},
                  state=RecordDict(), run_config=with_defaults({}))
    reply = app(message=msg, context=ctx)
    assert re.match(r"ConfigError: organisation clinic-a does not reveal .* share-metrics=false.*org-metrics=\"private\"",
                    reply.error.reason), reply.error.reason


def test_share_metrics_false_takes_part_in_a_private_run():
    strategy, replies = _run_secagg(PRIVATE, _nodes(3, seed=9), _updates(3, LR, STEPS, seed=9),
                                    node_config={"share-metrics": False})
    assert strategy.fit is not None and not any(r.has_error() for r in replies)


@pytest.mark.parametrize("mode", ["shared", "private"])
def test_what_the_coordinator_records_and_exports(mode):
    """metrics.jsonl's round line and the coordinator's per-organisation Prometheus series."""
    from prometheus_client import REGISTRY

    from app import reporting

    nodes = _nodes(3, seed=11)
    # Prometheus' registry is per process: each mode gets its own organisation names.
    strategy, _ = _run_secagg(PRIVATE | {"org-metrics": mode}, nodes, _updates(3, LR, STEPS, seed=11), org_prefix=mode)
    orgs = sorted(strategy.org_of.values())
    record = reporting.round_record(1, "secagg+", mode, orgs, strategy.fit, {"fit": 1.0, "round": 2.0})
    reporting.export_round(record, online=3, received_bytes=0)
    reporting.export_heldout(strategy.fit["heldout"])
    line = reporting.heldout_log_line(0, strategy.fit["heldout"])[0] % reporting.heldout_log_line(0, strategy.fit["heldout"])[1:]
    assert record["aggregated"] == orgs and record["num_examples"] == sum(x["n"] for x in nodes)
    # Which organisations the held-out figure covers: participation, known in both modes.
    assert strategy.fit["heldout"]["heldout_orgs"] == orgs
    assert REGISTRY.get_sample_value("fedlora_org_rounds_aggregated_total", {"org": orgs[0]}) >= 1
    # A counter that never failed is 0, not absent: dashboards and rate() need the series.
    assert REGISTRY.get_sample_value("fedlora_org_rounds_failed_total", {"org": orgs[0]}) == 0
    revealed = REGISTRY.get_sample_value("fedlora_org_train_images", {"org": orgs[0]})
    if mode == "shared":
        assert record["train_loss_by_org"][orgs[0]] == nodes[0]["report"]["train_loss"]
        assert revealed == nodes[0]["n"] and orgs[0] in line
        assert record["stage_compute_seconds"] == {"collect_masked_vectors": max(x["report"]["fit_seconds"] for x in nodes)}
    else:
        # The slowest node's compute time is one node's figure too.
        assert not [k for k in record if k.endswith("_by_org") or k in ("client_seconds", "stage_compute_seconds")], record
        assert revealed is None and orgs[0] not in line and "stay private" in line
    # Numbers, not strings: no organisation's figure in the record or the log line, in any form. The
    # same check on the shared record must find them (the control: a check that cannot fail proves nothing).
    figures = {org: {"train_images": x["n"], **{k: x["report"][k] for k in ("train_loss", "heldout_loss", "num_heldout")}}
               for org, x in zip(orgs, nodes)}
    found = record_leaks(record, figures) + record_leaks(strategy.fit["heldout"], figures) + log_leaks(line, figures)
    if mode == "private":
        assert not found, found
    else:
        assert {org for org in orgs if any(org in f for f in found)} == set(orgs), found


@pytest.mark.parametrize("mode", ["shared", "private"])
def test_a_node_that_drops_mid_round_is_recorded_as_dropped(mode):
    """SecAgg+ unmasks the survivors' sum without the dropped node's masks; the round's record
    names who dropped, and the update is the survivors' weighted mean."""
    from app import reporting

    nodes, updates = _nodes(3, seed=13), _updates(3, LR, STEPS, seed=13)
    nodes[1]["drops"] = True
    strategy, _ = _run_secagg(PRIVATE | {"org-metrics": mode}, nodes, updates, org_prefix=f"drop-{mode}")
    orgs = sorted(strategy.org_of.values())
    record = reporting.round_record(1, "secagg+", mode, orgs, strategy.fit, {"fit": 1.0, "round": 2.0})
    assert record["participants"] == orgs
    assert record["dropped"] == [orgs[1]] and record["aggregated"] == [orgs[0], orgs[2]]
    survivors = _exact([nodes[0], nodes[2]], [updates[0], updates[2]])
    assert record["num_examples"] == survivors["num_examples"]
    err = max(float(np.max(np.abs(g - u))) for g, u in zip(strategy.global_arrays, survivors["update"]))
    assert err < 1e-6, err


def _private_rounds(withhold: bool) -> tuple[list[dict], list[dict]]:
    """Three private rounds over the real protocol: 4 organisations, then 3 (org-104 away), then 4
    again; what the coordinator records, as app/server_app.py records it."""
    from app import reporting

    nodes = _nodes(4, seed=21)
    history: list[dict] = [{"round": 0, "aggregation": "secagg+", "heldout_loss": None, "seconds": {}}]
    for rnd, k in ((1, 4), (2, 3), (3, 4)):
        strategy, _ = _run_secagg(PRIVATE, nodes[:k], _updates(k, LR, STEPS, seed=rnd)[:k], org_prefix="org")
        heldout = strategy.fit["heldout"]
        if withhold:
            heldout = reporting.private_heldout_record(rnd - 1, heldout, history)
        history[rnd - 1] |= heldout
        record = reporting.round_record(rnd, "secagg+", "private", sorted(strategy.org_of.values()), strategy.fit,
                                        {"fit": 1.0, "round": 2.0})
        record["private_errors"] = QuantizationSettings.private(LR, STEPS, k).private_errors(
            k, W, record["num_examples"], strategy.fit["heldout"]["num_heldout"])
        history.append(reporting.private_round(record, history) if withhold else record)
    return history, nodes


def _differences(history: list[dict], key: str) -> set:
    values = [m[key] for m in history if m.get(key) is not None]
    return {a - b for a in values for b in values}


def test_private_records_reveal_no_organisation_when_participation_changes():
    """The totals over org-101..104 minus those over org-101..103 are org-104's own count and figures:
    the round that org-104 missed, and the held-out figure it did not measure, are withheld."""
    away = 3  # org-104
    history, nodes = _private_rounds(withhold=True)
    n, h = nodes[away]["n"], nodes[away]["report"]["num_heldout"]
    assert n not in _differences(history, "num_examples") and h not in _differences(history, "num_heldout")
    # Nor is any other total of round 2 left to subtract, or its precision figures (they name the counts).
    assert not {"num_examples", "train_loss", "skipped_images", "client_seconds_mean"} & set(history[2])
    assert history[2]["withheld"]["would_reveal"] == ["org-104"] and set(history[2]["private_errors"]) == {"images"}
    assert history[1]["heldout_loss"] is None and "num_heldout" not in history[1]
    assert history[1]["heldout_withheld"]["would_reveal"] == ["org-104"]
    assert set(history[3]["private_errors"]) == {"images", "train_loss", "heldout_loss", "update"}  # four again
    # What stays: every figure over the same four organisations, exact.
    assert history[1]["num_examples"] == history[3]["num_examples"] == sum(x["n"] for x in nodes)
    assert history[0]["num_heldout"] == history[2]["num_heldout"] == sum(x["report"]["num_heldout"] for x in nodes)
    # The negative control: recorded as before, the differences give org-104's own counts.
    before, _ = _private_rounds(withhold=False)
    assert n in _differences(before, "num_examples") and h in _differences(before, "num_heldout")


def test_revealed_by_finds_any_linear_combination():
    from app.reporting import revealed_by

    assert revealed_by([["a", "b"]]) == [] and revealed_by([["a"]]) == ["a"]
    assert revealed_by([["a", "b", "c"], ["a", "b"]]) == ["c"]
    assert revealed_by([["a", "b", "c"], ["a", "b", "d"]]) == []  # c - d only: no one organisation's figure
    assert revealed_by([["a", "b"], ["b", "c"], ["a", "c"]]) == ["a", "b", "c"]  # three equations, three unknowns
