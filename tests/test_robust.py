"""No member can steer the global model beyond what the mode allows, or break the run.

In process, with Flower's real workflows (SecAgg+ with real masks, plain fit and evaluate) and the
ServerApp's own Federation, strategy and FastGrid; the nodes are ClientApps that skip training and
misbehave on purpose (tests/federation-level checks are in test_federation_robust.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from prometheus_client import REGISTRY

from app import wire
from app.admission import RunFailed
from app.aggregate import CheckedSecAggPlus
from app.client_app import refuse_revealing_runs, secagg_when_asked
from app.config import ConfigError, RunConfig
from app.outputs import read_adapter
from app.secagg import adam_update_bound
from app.server_app import Federation
from conftest import with_defaults
from test_private_metrics import InProcessGrid, _nodes, _run_secagg, _server_identity  # noqa: F401 (autouse)
from test_secagg import _updates

LR, STEPS = 1e-3, 8
C = adam_update_bound(LR, STEPS)


# --- a whole run of the ServerApp, in process -------------------------------------------------------

class Node(NumPyClient):
    """An organisation's node minus the training: a small random update, a full honest report; or one
    misbehaviour (`does`)."""

    def __init__(self, org: str, n: int, does: str | None, rnd_seen: list) -> None:
        self.org, self.n, self.does, self.rnd_seen = org, n, does, rnd_seen

    def get_properties(self, config):
        if self.does == "garbage-props":
            return {"org": 7, "num-train": "many"}
        return {"org": self.org, "num-train": 10**9 if self.does == "claims-1e9" else self.n, "num-heldout": 2,
                "skipped-images": 0}

    def _received(self, parameters, config):
        from app.model import weights_fingerprint

        return weights_fingerprint(wire.unpack(parameters, config[wire.SHAPES_KEY]))

    def fit(self, parameters, config):
        rnd = int(config["server-round"])
        self.rnd_seen.append((self.org, rnd))
        if self.does == "declines-round-1" and rnd == 1:
            raise RuntimeError(f"[{self.org}] declines round 1: its policy needs min-peers=5")
        rng = np.random.default_rng(hash((self.org, rnd)) % 2**32)
        update = rng.uniform(-C / 10, C / 10, parameters[0].size).astype(np.float32)
        if self.does == "nan-update":
            update[3] = np.nan
        report = {"org": self.org, "received_fingerprint": self._received(parameters, config), "skipped_images": 0,
                  "heldout_loss": 0.5, "num_heldout": 2, "eval_seconds": 0.1, "fit_seconds": 1.0, "train_loss": 0.4,
                  "train_seconds": 0.9, "images_per_second": 10.0}
        if self.does == "wrong-fingerprint":
            report["received_fingerprint"] = "0123456789abcdef"
        if self.does == "no-fingerprint":
            del report["received_fingerprint"]
        return [update], self.n, report

    def evaluate(self, parameters, config):
        return 0.45, 2, {"org": self.org, "heldout_loss": 0.45, "num_heldout": 2, "eval_seconds": 0.1,
                         "received_fingerprint": self._received(parameters, config), "skipped_images": 0}


class FederationGrid(InProcessGrid):
    """InProcessGrid plus what admission asks of a SuperLink grid: registered names and the run."""

    def __init__(self, app, contexts, names):
        super().__init__(app, contexts)
        self.names = names
        self.run = type("Run", (), {"run_id": 1})()

    def get_nodes(self):
        return [type("Node", (), {"node_id": nid, "name": self.names[nid]})() for nid in self.contexts]


def _federation(tmp_path, tiny_model, behaviours: dict[str, str | None], mods=None, **settings):
    """Run the ServerApp's Federation over in-process nodes; returns (output dir, rounds each org fit)."""
    run_config = with_defaults({
        "base-model": str(tiny_model), "resolution": 32, "num-server-rounds": 2, "local-steps": STEPS,
        "learning-rate": LR, "output-dir": str(tmp_path / "out"), "sample-every": 0, "min-nodes": 3,
        "node-wait-timeout": 1, "prepare-timeout": 1, "round-timeout": 30, **settings})
    seen: list = []
    ids = {org: 201 + i for i, org in enumerate(behaviours)}
    nodes = {nid: Node(org, 10 + i, behaviours[org], seen) for i, (org, nid) in enumerate(ids.items())}
    app = ClientApp(client_fn=lambda ctx: nodes[ctx.node_id].to_client(),
                    mods=mods if mods is not None else [refuse_revealing_runs, secagg_when_asked])
    contexts = {nid: Context(run_id=1, node_id=nid, node_config={"data-dir": "/d", "org": nodes[nid].org},
                             state=RecordDict(), run_config=run_config) for nid in nodes}
    grid = FederationGrid(app, contexts, {nid: nodes[nid].org for nid in nodes})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    Federation(grid, ctx, RunConfig.from_flower(run_config)).run()
    return tmp_path / "out", seen


def _history(out):
    return {m["round"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(autouse=True)
def _fast_admission(monkeypatch):
    from app import admission

    monkeypatch.setattr(admission, "POLL_SECONDS", 0.01)


MISBEHAVING = {"org-a": None, "org-b": None, "org-c": None, "liar": "claims-1e9", "junk": "garbage-props",
               "poisoner": "nan-update", "stale": "wrong-fingerprint", "mute": "no-fingerprint",
               "busy": "declines-round-1"}


def test_fedavg_run_drops_each_misbehaving_node_by_name_and_completes(tmp_path, tiny_model):
    """aggregation="fedavg": one node claims 10^9 images, one answers prepare with garbage, one sends a
    NaN update, one a wrong fingerprint, one none; each is refused for the run with its name and
    reason, the run completes with the others, and no checkpoint holds a non-finite value. A node
    that declines round 1 by its own policy sits that round out and takes part in round 2."""
    out, seen = _federation(tmp_path, tiny_model, MISBEHAVING, aggregation="fedavg")
    h = _history(out)
    honest = ["org-a", "org-b", "org-c"]
    assert h[1]["aggregated"] == honest and h[2]["aggregated"] == sorted(honest + ["busy"])
    assert sorted(h[1]["dropped"]) == ["busy", "mute", "poisoner", "stale"], h[1]
    refused = h[2]["refused"]
    assert sorted(refused) == ["junk", "liar", "mute", "poisoner", "stale"], refused
    assert "1000000000 training images, more than max-weight-per-org=10000" in refused["liar"]
    assert "names no organisation (org=7)" in refused["junk"]
    assert "not finite" in refused["poisoner"] and "no fingerprint" in refused["mute"]
    assert "trained from weights other than the global adapter sent" in refused["stale"]
    assert "busy" not in refused and ("busy", 2) in seen
    assert not {org for org, rnd in seen if rnd == 2} & {"poisoner", "stale", "mute"}  # not asked again
    for rnd in (0, 1, 2):
        adapter = read_adapter(out / "rounds" / f"round-{rnd:04d}")
        assert all(np.all(np.isfinite(a)) for a in adapter.values())
    assert REGISTRY.get_sample_value("fedlora_org_refused_total", {"org": "poisoner"}) >= 1
    assert REGISTRY.get_sample_value("fedlora_org_rounds_failed_total", {"org": "poisoner"}) >= 1


def test_the_run_fails_only_below_min_nodes(tmp_path, tiny_model):
    with pytest.raises(RunFailed, match=r"round 2: 2 of min-nodes=3 nodes ready.*poisoner.*not finite"):
        _federation(tmp_path, tiny_model, {"org-a": None, "org-b": None, "poisoner": "nan-update"},
                    aggregation="fedavg")
    assert (tmp_path / "out" / "rounds" / "round-0001").is_dir() and not (tmp_path / "out" / "rounds" / "round-0002").exists()


class _MaskedAttack:
    """A member's mod around secaggplus_mod: after masking, it adds `add` to its masked array `index`
    (modulo 2^32): nothing the coordinator can see in a masked vector tells it apart."""

    def __init__(self, org_node: int, index: int, add) -> None:
        self.node, self.index, self.add = org_node, index, add

    def __call__(self, msg, ctxt, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None  # secaggplus_mod pops it
        reply = call_next(msg, ctxt)
        if ctxt.node_id != self.node or reply.has_error() or stage != Stage.COLLECT_MASKED_VECTORS:
            return reply
        out = reply.content.config_records[RECORD_KEY_CONFIGS]
        arrays = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
        arrays[self.index] = (arrays[self.index] + np.asarray(self.add, np.int64)) % 2**32
        out[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return reply


def test_secagg_run_fails_when_a_member_masks_a_larger_weight_and_saves_nothing(tmp_path, tiny_model):
    """The member declares its 12 examples but masks 20x the weight factor: the unmasked total differs
    from what the nodes declared; the round fails naming the candidates, and round 1 is not written."""
    attack = _MaskedAttack(203, 0, 20 * 2**29)
    with pytest.raises(RunFailed, match=r"round 1: the SecAgg\+ weight factors sum to .* one of \['org-a', 'org-b', "
                                        r"'org-c'\] masked a weight other than the one it reported"):
        _federation(tmp_path, tiny_model, {"org-a": None, "org-b": None, "org-c": None},
                    mods=[refuse_revealing_runs, attack, secagg_when_asked])
    assert not (tmp_path / "out" / "rounds" / "round-0001").exists()


# --- weights, in one SecAgg+ round ---------------------------------------------------------------------

def test_a_node_declaring_1e9_examples_is_dropped_before_its_vector_is_summed():
    """Without the app's own refusal (Flower's secaggplus_mod only) a node declares 10^9 examples: over
    max-weight-per-org and the round's max weight. It is dropped as if it died; the others aggregate."""
    nodes, updates = _nodes(4, seed=21), _updates(4, 1e-4, 50, seed=21)
    prepared = [x["n"] for x in nodes]
    nodes[1]["n"] = 10**9
    strategy, _ = _run_secagg({"learning-rate": 1e-4, "local-steps": 50}, nodes, updates, prepared=prepared,
                              mods=[secaggplus_mod])
    assert list(strategy.misbehaved) == ["org-102"] and "declared 1000000000" in strategy.misbehaved["org-102"]
    assert strategy.fit["orgs"] == ["org-101", "org-103", "org-104"]


def test_the_weight_total_seam_into_flower_is_read():
    """CheckedSecAggPlus reads the unmasked weight total through Flower 1.41's
    secaggplus_workflow.factor_extract. If an upgrade moves it, this fails (and so would every
    SecAgg+ round, loudly: an unread total is refused)."""
    from flwr.server.workflow.secure_aggregation import secaggplus_workflow

    assert callable(secaggplus_workflow.factor_extract)
    nodes = _nodes(3, seed=22)
    strategy, _ = _run_secagg({"learning-rate": 1e-4, "local-steps": 50}, nodes, _updates(3, 1e-4, 50, seed=22))
    q = strategy.quant
    assert strategy.weight_total == sum(round(x["n"] / q.max_weight * q.quantization_range) for x in nodes)
    assert strategy.fit is not None


class _HeavierThanDeclared(_MaskedAttack):
    """Declares 1 example like everyone, but masks the weight factor of `times` examples, with values
    re-encoded at that weight (it knows Q and C): an honest-looking reply that weighs what it chose."""

    def __init__(self, node: int, delta: int, value: float, c: float) -> None:
        super().__init__(node, 0, delta)
        self.levels = int(round(value * delta / (2 * c)))

    def __call__(self, msg, ctxt, call_next):
        reply = super().__call__(msg, ctxt, call_next)
        if self.add and ctxt.node_id == self.node and not reply.has_error():
            out = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in out:
                arrays = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
                arrays[1] = (arrays[1] + self.levels) % 2**32
                out[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(x) for x in arrays]
        return reply


@pytest.mark.parametrize("checked", [True, False])
def test_a_member_masking_a_heavier_weight_than_it_declared(checked, monkeypatch):
    """Every member declares 1 example (max weight 100, from counts prepared earlier); one masks the
    weight of 100 and its update (+C/2 everywhere) at that weight. With the weight-total check the
    round fails; the negative variant, with the check switched off, shows what it stops: the member's
    update becomes the aggregate."""
    from app.aggregate import RoundStrategy

    if not checked:
        monkeypatch.setattr(RoundStrategy, "_check_weight_total", lambda self, rnd, by_proxy: None)
    lr, steps = 1e-4, 50
    c = adam_update_bound(lr, steps)
    nodes, updates = _nodes(3, seed=23), _updates(3, lr, steps, seed=23)
    for x in nodes:
        x["n"] = 1
    updates[2] = [np.full_like(u, c / 2) for u in updates[2]]
    q = 2**30 - 1  # levels(3)
    per_example = round(1 / 100 * q)
    attack = _HeavierThanDeclared(103, 99 * per_example, c / 2, c)
    run = lambda: _run_secagg({"learning-rate": lr, "local-steps": steps}, nodes, updates,  # noqa: E731
                              prepared=[1, 1, 100], mods=[attack, secagg_when_asked])
    if checked:
        with pytest.raises(RunFailed, match=r"weight factors sum to .* masked a weight other than the one it reported"):
            run()
        return
    strategy, _ = run()
    got = np.concatenate([a.ravel() for a in strategy.global_arrays])
    assert np.all(np.abs(got - c / 2) < c / 20), "the member's masked weight did not dominate"


@pytest.mark.parametrize("count,why", [(-990, "beyond"), (-2000, r"unmask to -?\d+, outside 1\.\."),
                                       (-1000, r"unmask to 0, outside 1\.\.")])
def test_private_mode_a_negative_count_fails_the_round(count, why):
    """org-metrics="private": nodes weight their own vectors. Honest nodes hold 1000 images together;
    a member claiming -990 would multiply the global update by 100, -2000 flip it, -1000 divide by
    zero. Each fails the round loudly; nothing is applied."""
    nodes, updates = _nodes(3, seed=24), _updates(3, 1e-4, 50, seed=24)
    nodes[0]["n"], nodes[1]["n"], nodes[2]["n"] = 600, 400, count
    with pytest.raises(RunFailed, match=why):
        _run_secagg({"org-metrics": "private", "learning-rate": 1e-4, "local-steps": 50}, nodes, updates)


def test_private_mode_honest_counts_pass():
    nodes, updates = _nodes(3, seed=24), _updates(3, 1e-4, 50, seed=24)
    strategy, _ = _run_secagg({"org-metrics": "private", "learning-rate": 1e-4, "local-steps": 50}, nodes, updates)
    assert strategy.fit is not None and strategy.weight_total == 3 * strategy.quant.quantization_range


# --- SecAgg+ cannot bound a member; robust mode can ------------------------------------------------------

def _shifted_round(shift_fraction: float):
    """Three members with tiny honest updates; member 103 adds `shift_fraction` x C to every coordinate
    of the aggregate by adding levels to its masked values (it knows Q, C and the weight total)."""
    lr, steps = 1e-4, 50
    c = adam_update_bound(lr, steps)
    nodes, updates = _nodes(3, seed=25), _updates(3, lr, steps, seed=25)
    for x in nodes:
        x["n"] = 100
    updates = [[(u / 100).astype(np.float32) for u in upd] for upd in updates]
    q = 2**30 - 1
    q_total = 3 * q
    levels_to_add = int(shift_fraction * c * q_total / (2 * c) * (q / q))  # aggregate += levels * 2C / q_total
    attack = _MaskedAttack(103, 1, levels_to_add)
    return c, updates, _run_secagg({"learning-rate": lr, "local-steps": steps}, nodes, updates,
                                   mods=[attack, secagg_when_asked])


def test_under_secagg_a_member_moves_the_aggregate_within_the_range_check_and_no_further():
    """What docs/threat-model.md says of SecAgg+: a member moves every coordinate of the aggregate by
    0.9 C, three times what its honest weight (1/3 of updates within C) could, and the coordinator
    accepts it: it is within the range check. At 1.5 C the range check refuses the round."""
    c, updates, (strategy, _) = _shifted_round(0.9)
    honest = [sum(u[i].astype(np.float64) for u in updates) / 3 for i in range(len(updates[0]))]
    moved = np.concatenate([(g - h).ravel() for g, h in zip(strategy.global_arrays, honest)])
    assert strategy.fit is not None and np.all(np.abs(moved - 0.9 * c) < 0.01 * c)
    with pytest.raises(RunFailed, match=r"SecAgg\+ aggregate has an element of .* outside"):
        _shifted_round(1.5)


def _plain_round(aggregation: str, updates, counts, **settings):
    """One plain fit round (Flower's default fit workflow) through the ServerApp's strategy and FastGrid."""
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WKey
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from app.aggregate import RoundStrategy
    from app.grid import FastGrid
    from flwr.common import ConfigRecord

    run_config = with_defaults({"aggregation": aggregation, "learning-rate": 1e-4, "local-steps": 50, **settings})
    cfg = RunConfig.from_flower(run_config)
    ids = list(range(301, 301 + len(updates)))

    class Fixed(NumPyClient):
        def __init__(self, i):
            self.i = i

        def fit(self, parameters, config):
            return wire.pack(updates[self.i]), counts[self.i], {
                "received_fingerprint": "x", "skipped_images": 0, "num_heldout": 1, "heldout_loss": 0.5,
                "eval_seconds": 0.1, "fit_seconds": 1.0, "train_loss": 0.4, "train_seconds": 1.0,
                "images_per_second": 1.0}

    app = ClientApp(client_fn=lambda ctx: Fixed(ctx.node_id - 301).to_client(), mods=[secagg_when_asked])
    contexts = {nid: Context(run_id=1, node_id=nid, node_config={"data-dir": "/d", "org": f"o{nid}"}, state=RecordDict(),
                             run_config=run_config) for nid in ids}
    grid = InProcessGrid(app, contexts)
    strategy = RoundStrategy(cfg)
    strategy.global_arrays = [np.zeros_like(a) for a in updates[0]]
    clients = SimpleClientManager()
    for nid in ids:
        proxy = GridClientProxy(node_id=nid, grid=grid, run_id=1)
        clients.register(proxy)
        strategy.participants.append(proxy)
        strategy.org_of[nid] = f"o{nid}"
    legacy = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=clients)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WKey.START_TIME: 0.0, WKey.CURRENT_ROUND: 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(strategy.wire(), True)
    default_fit_workflow(FastGrid(grid, 60.0, poll_seconds=0.0, check=strategy.check_reply), legacy)
    return strategy


def test_robust_mode_bounds_a_poisoned_update():
    """Four honest members and one poisoner whose update sits at +C on every coordinate (the largest the
    per-update bound lets through) and claims the most examples. FedAvg moves toward it; the robust
    mode's trimmed mean keeps every coordinate within the honest members' range."""
    lr, steps = 1e-4, 50
    c = adam_update_bound(lr, steps)
    honest = _updates(4, lr, steps, seed=26)
    poisoned = [np.full_like(u, c) for u in honest[0]]
    updates, counts = honest + [poisoned], [100, 100, 100, 100, 10_000]
    lo = [np.min(np.stack([h[i] for h in honest]), axis=0) for i in range(3)]
    hi = [np.max(np.stack([h[i] for h in honest]), axis=0) for i in range(3)]

    robust = _plain_round("robust", updates, counts, **{"min-nodes": 3})
    assert not robust.misbehaved
    for g, a, b in zip(robust.global_arrays, lo, hi):
        assert np.all(g >= a - 1e-7) and np.all(g <= b + 1e-7)
    fedavg = _plain_round("fedavg", updates, counts)
    assert min(float(np.min(g)) for g in fedavg.global_arrays) > 0.9 * c  # steered to the poisoner's update


def test_robust_and_fedavg_refuse_an_update_beyond_the_bound():
    lr, steps = 1e-4, 50
    c = adam_update_bound(lr, steps)
    updates = _updates(4, lr, steps, seed=27)
    updates[3] = [np.full_like(u, 3 * c) for u in updates[3]]
    for mode in ("robust", "fedavg"):
        strategy = _plain_round(mode, updates, [10, 10, 10, 10])
        assert list(strategy.misbehaved) == ["o304"] and "beyond" in strategy.misbehaved["o304"]
        assert strategy.fit["orgs"] == ["o301", "o302", "o303"]


def test_equal_weighting_and_robust_settings_are_checked():
    avg = _plain_round("fedavg", _updates(3, 1e-4, 50, seed=28), [1, 10, 1000], weighting="equal")
    want = [sum(u[i].astype(np.float64) for u in _updates(3, 1e-4, 50, seed=28)) / 3 for i in range(3)]
    assert max(float(np.max(np.abs(g - w))) for g, w in zip(avg.global_arrays, want)) < 1e-7
    with pytest.raises(ConfigError, match="weighting=\"equal\" needs aggregation=\"fedavg\""):
        RunConfig.from_flower(with_defaults({"weighting": "equal"}))
    with pytest.raises(ConfigError, match="robust-trim=2 needs min-nodes >= 5"):
        RunConfig.from_flower(with_defaults({"aggregation": "robust", "robust-trim": 2}))


def test_a_non_finite_adapter_is_never_checkpointed(tmp_path):
    from app.checkpoint import Recorder
    from app.outputs import OutputDir

    out = OutputDir(tmp_path)
    out.claim({"x": 1})
    recorder = Recorder(RunConfig.from_flower(with_defaults({})), out)
    recorder.names = ["a"]
    with pytest.raises(RunFailed, match="not finite; it was not saved"):
        recorder.checkpoint(1, {"round": 1, "seconds": {}}, [np.array([1.0, math.nan], np.float32)], None, False)
    assert not out.round_dir(1).exists()


def test_a_secagg_round_left_without_enough_nodes_by_refusals_runs_again_without_them(tmp_path, tiny_model):
    """Two of four members misbehave in the masked-vector stage: too few remain for SecAgg+ to unmask
    (any 3 of 4 shares are needed). The round is run again with the two others, as min-nodes allows."""
    out, seen = _federation(tmp_path, tiny_model, {"org-a": None, "org-b": None, "stale": "wrong-fingerprint",
                                                   "mute": "no-fingerprint"}, **{"min-nodes": 2})
    h = _history(out)
    assert h[1]["aggregated"] == ["org-a", "org-b"] and sorted(h[1]["refused"]) == ["mute", "stale"]
    assert [rnd for org, rnd in seen if org == "org-a"] == [1, 1, 2]  # round 1 twice, then round 2
