"""The node's own rules against a coordinator that lies: Flower's real SecAgg+ workflow, tampered with.

Each attack runs Flower's SecAggPlusWorkflow in this process (tests/test_private_metrics.py's
harness: the app's real mods, real masks and key shares) behind a ServerApp that edits what it
sends. Against the app without app/node_guard.py's floor, each attack reads one organisation's
update out of its masked vector, with Flower's own primitives; against the app, that organisation
sends nothing the attack can use, and says why.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import ClientApp
from flwr.common import FitIns, GetPropertiesIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, parameters_addition, parameters_mod,
                                                                parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from app import wire
from app.client_app import MODS, refuse_revealing_runs, secagg_when_asked
from app.node_guard import scrub, without_names
from conftest import with_defaults
from test_private_metrics import FixedClient, _nodes, _run_secagg, _server_identity  # noqa: F401 (autouse fixture)
from test_secagg import _updates

LR, STEPS = 1e-4, 50
# The app as it was before the node's floor: the same mods without secagg_floor.
UNGUARDED = [without_names, refuse_revealing_runs, secagg_when_asked]
TARGET = 101  # the organisation under attack (_run_secagg numbers nodes from 101)


class Tampering:
    """What the SecAgg+ workflow sends, edited on the way: `edit(stage, destination, configs)`."""

    def __init__(self, grid, edit) -> None:
        self.grid, self.edit = grid, edit
        self.sent: dict[tuple[str, int], dict] = {}  # (stage, node) -> the configs it received

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            stage, dst = configs[Key.STAGE], msg.metadata.dst_node_id
            self.edit(stage, dst, configs)
            self.sent[stage, dst] = dict(configs)
        return self.grid.send_and_receive(messages, timeout=timeout)


def attack(k: int, edit, mods) -> dict:
    """One SecAgg+ round of k organisations behind a tampering ServerApp; what came back to it."""
    seen = {}

    def wrap(grid):
        seen["grid"], seen["tamper"] = grid, Tampering(grid, edit)
        return seen["tamper"]

    nodes, updates = _nodes(k, seed=k), _updates(k, LR, STEPS, seed=k)
    try:
        _run_secagg({"learning-rate": LR, "local-steps": STEPS}, nodes, updates, mods=mods, wrap_grid=wrap)
    except Exception as err:  # noqa: BLE001 - a tampered round may not aggregate; the attacker has its replies
        seen["failed"] = err
    replies: dict[str, dict[int, Message]] = {}
    by_key = {Key.PUBLIC_KEY_1: Stage.SETUP, Key.CIPHERTEXT_LIST: Stage.SHARE_KEYS,
              Key.MASKED_PARAMETERS: Stage.COLLECT_MASKED_VECTORS, Key.NODE_ID_LIST: Stage.UNMASK}
    for reply in seen["grid"].replies:
        if reply.has_error():
            stage = "errors"
        else:
            stage = next(s for key, s in by_key.items() if key in reply.content.config_records[RECORD_KEY_CONFIGS])
        replies.setdefault(stage, {})[reply.metadata.src_node_id] = reply
    return {"replies": replies, "sent": seen["tamper"].sent, "contexts": seen["grid"].contexts,
            "update": wire.pack(updates[0]), "nodes": nodes}


def _configs(reply: Message):
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def _state(result: dict, nid: int):
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState

    return SecAggPlusState(**result["contexts"][nid].state.config_records[RECORD_KEY_STATE])


def unmask_target(result: dict, rd_seed: bytes, pairwise: dict[int, bytes]) -> list[np.ndarray]:
    """The target's own update, from its masked vector, its mask seed and its pairwise mask keys: the
    unmask stage's arithmetic (flwr.server.workflow.secure_aggregation) applied to one node alone."""
    state = _state(result, TARGET)  # its quantization settings: what setup told every node
    masked = [bytes_to_ndarray(b) for b in _configs(result["replies"][Stage.COLLECT_MASKED_VECTORS][TARGET])[
        Key.MASKED_PARAMETERS]]
    shapes = [a.shape for a in masked]
    vector = parameters_subtraction(masked, pseudo_rand_gen(rd_seed, state.mod_range, shapes))
    for peer, key in pairwise.items():
        mask = pseudo_rand_gen(key, state.mod_range, shapes)
        vector = parameters_subtraction(vector, mask) if TARGET > peer else parameters_addition(vector, mask)
    q_ratio, quantized = factor_extract(parameters_mod(vector, state.mod_range))
    return [a * (state.target_range / q_ratio) for a in dequantize(quantized, state.clipping_range, state.target_range)]


def shares_of_target(result: dict) -> tuple[list[bytes], list[bytes]]:
    """The key shares of the target that the unmask replies revealed: (mask seed shares, mask key shares)."""
    seeds, keys = [], []
    for nid, reply in result["replies"].get(Stage.UNMASK, {}).items():
        active = len(result["sent"][Stage.UNMASK, nid][Key.ACTIVE_NODE_ID_LIST])
        for i, (owner, share) in enumerate(zip(_configs(reply)[Key.NODE_ID_LIST], _configs(reply)[Key.SHARE_LIST])):
            if owner == TARGET:
                (seeds if i < active else keys).append(share)
    return seeds, keys


def public_key_1(result: dict, nid: int) -> bytes:
    return _configs(result["replies"][Stage.SETUP][nid])[Key.PUBLIC_KEY_1]


def with_accomplice(result: dict, accomplice: int) -> list[np.ndarray]:
    """The coordinator plus one node of its own (`accomplice`, whose secret key it has): the target's
    mask seed from the honest unmask stage, the only pairwise mask from the accomplice's key."""
    seeds, _ = shares_of_target(result)
    pairwise = {accomplice: generate_shared_key(bytes_to_private_key(_state(result, accomplice).sk1),
                                                bytes_to_public_key(public_key_1(result, TARGET)))}
    return unmask_target(result, combine_shares(seeds), pairwise)


def from_both_shares(result: dict) -> list[np.ndarray]:
    """The coordinator alone: it got both the target's mask seed and its mask key rebuilt from shares."""
    seeds, keys = shares_of_target(result)
    sk1 = combine_shares(keys)
    peers = [nid for nid in result["contexts"] if nid != TARGET]
    pairwise = {p: generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(public_key_1(result, p)))
                for p in peers}
    return unmask_target(result, combine_shares(seeds), pairwise)


def read(result: dict, recover) -> bool:
    """Whether the attack recovered the target's update (to SecAgg+'s quantization precision)."""
    try:
        got = recover(result)
    except Exception:  # noqa: BLE001 - missing replies or shares: nothing to read
        return False
    return max(float(np.max(np.abs(g - u))) for g, u in zip(got, result["update"])) < 1e-6


def refusal(result: dict, nid: int = TARGET) -> str:
    errors = result["replies"].get("errors", {})
    assert nid in errors, f"node {nid} did not refuse: {sorted(result['replies'])}"
    return errors[nid].error.reason


# --- the four attacks ------------------------------------------------------------------------------

def shares_from_one_peer(stage, dst, configs):
    """3 organisations in the round, all keys relayed; the target gets the key shares of one peer only
    (the accomplice's: the node after it)."""
    if stage == Stage.COLLECT_MASKED_VECTORS and dst == TARGET:
        i = configs[Key.SOURCE_LIST].index(TARGET + 1)
        configs[Key.CIPHERTEXT_LIST] = configs[Key.CIPHERTEXT_LIST][i:i + 1]
        configs[Key.SOURCE_LIST] = [TARGET + 1]


def states_five_sends_two(stage, dst, configs):
    """2 organisations; the setup stage tells them the round has 5."""
    if stage == Stage.SETUP:
        configs[Key.SAMPLE_NUMBER] = 5


def lists_target_active_and_dropped(stage, dst, configs):
    if stage == Stage.UNMASK:
        configs[Key.DEAD_NODE_ID_LIST] = configs[Key.DEAD_NODE_ID_LIST] + [TARGET]


def half_threshold_split_views(stage, dst, configs):
    """4 organisations, reconstruction threshold 2 (half): at unmasking, two nodes hear the target is
    active, two that it dropped. No message lists it both ways, yet the coordinator gets both secrets."""
    if stage == Stage.SETUP:
        configs[Key.THRESHOLD] = 2
    if stage == Stage.UNMASK and dst in (TARGET + 2, TARGET + 3):
        configs[Key.ACTIVE_NODE_ID_LIST] = [n for n in configs[Key.ACTIVE_NODE_ID_LIST] if n != TARGET]
        configs[Key.DEAD_NODE_ID_LIST] = configs[Key.DEAD_NODE_ID_LIST] + [TARGET]


ATTACKS = {
    "shares from fewer peers than the round has": (3, shares_from_one_peer, lambda r: with_accomplice(r, TARGET + 1),
                                                   r"refused to send its masked update: it received key shares from 1 "
                                                   r"other node\(s\), fewer than its node setting min-peers=2"),
    "a larger sample stated than delivered": (2, states_five_sends_two, lambda r: with_accomplice(r, TARGET + 1),
                                              r"the coordinator relayed the keys of 1 other node\(s\), fewer than its "
                                              r"node setting min-peers=2 \(the sample size the coordinator states does "
                                              r"not count\)"),
    "a peer listed both as active and as dropped": (3, lists_target_active_and_dropped, from_both_shares,
                                                    r"refused to unmask: node\(s\) \[101\] are listed both as active "
                                                    r"and as dropped"),
    "a threshold at half the nodes": (4, half_threshold_split_views, from_both_shares,
                                      r"reconstruction threshold 2 is at or below half of the 4 nodes holding shares"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_attack_reads_an_update_from_the_unguarded_app(name):
    """The negative control: without the floor, each attack reads the target's own update."""
    k, edit, recover, _ = ATTACKS[name]
    result = attack(k, edit, UNGUARDED)
    assert read(result, recover), f"{name}: the attack did not recover the update: the test would prove nothing"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_node_with_min_peers_gives_the_attack_nothing(name, caplog):
    k, edit, recover, reason = ATTACKS[name]
    with caplog.at_level(logging.ERROR, logger="flwr"):
        result = attack(k, edit, MODS)
    assert re.search(reason, refusal(result)), refusal(result)
    assert not read(result, recover)
    if "unmask" in reason:  # every honest node refuses to reveal the shares: none leave
        assert Stage.UNMASK not in result["replies"]
    else:  # the target never sent a masked update, nor trained for one
        assert TARGET not in result["replies"].get(Stage.COLLECT_MASKED_VECTORS, {})
    # The organisation's own log says so.
    assert any(r.levelno == logging.ERROR and "refused" in r.getMessage() and "[org-101]" in r.getMessage()
               for r in caplog.records), caplog.text


def test_an_honest_round_passes_the_floor():
    """The workflow as the app's ServerApp runs it: 3 nodes, threshold 2 of 3, no node refuses."""
    result = attack(3, lambda *_: None, MODS)
    assert "errors" not in result["replies"] and len(result["replies"][Stage.UNMASK]) == 3


def test_a_round_of_two_is_refused_by_default_and_allowed_by_min_peers_1():
    assert "min-peers=2" in refusal(attack(2, lambda *_: None, MODS))
    strategy, replies = _run_secagg({"learning-rate": LR, "local-steps": STEPS}, _nodes(2, seed=1),
                                    _updates(2, LR, STEPS, seed=1), node_config={"min-peers": 1})
    assert strategy.fit is not None and not any(r.has_error() for r in replies)


def test_flower_seams_the_floor_relies_on():
    """secaggplus_mod's stage names, config keys and the node state the tests read: a Flower upgrade
    that moves them fails here first."""
    import importlib
    import inspect

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

    assert Stage.all() == ("setup", "share_keys", "collect_masked_vectors", "unmask")
    assert (Key.THRESHOLD, Key.SOURCE_LIST, Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST) == (
        "threshold", "srcs", "active_nids", "dead_nids")
    # The masked vector is made with the peers in SOURCE_LIST, nothing else (what min-peers counts).
    assert "for src, ciphertext in zip(srcs, ciphertexts" in inspect.getsource(mod._collect_masked_vectors)


# --- require-secagg --------------------------------------------------------------------------------

def _plain_fit(node_config: dict) -> Message:
    update = _updates(1, LR, STEPS)[0]
    node = _nodes(1, seed=3)[0]
    app = ClientApp(client_fn=lambda ctx: FixedClient(node, update).to_client(), mods=MODS)
    ins = FitIns(ndarrays_to_parameters(wire.pack([np.zeros_like(u) for u in update])),
                 {"server-round": 1} | wire.shapes_config(update))
    msg = Message(content=compat.fitins_to_recorddict(ins, True), dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": "/d", "org": "clinic-a"} | node_config,
                  state=RecordDict(), run_config=with_defaults({"aggregation": "fedavg"}))
    return app(message=msg, context=ctx)


def test_require_secagg_refuses_a_plain_training_message():
    reply = _plain_fit({"require-secagg": True})
    assert reply.has_error() and not reply.has_content()
    assert "refused a training message without SecAgg+" in reply.error.reason
    assert "require-secagg=true" in reply.error.reason and "aggregation='fedavg'" in reply.error.reason
    # The control: without the setting, the same message gets the update in plain.
    plain = _plain_fit({})
    assert not plain.has_error() and compat.recorddict_to_fitres(plain.content, False).num_examples > 0


# --- no names out ----------------------------------------------------------------------------------

def test_scrub_keeps_the_reason_and_drops_paths_and_file_names():
    node = {"data-dir": "/srv/images/ward-7", "cache-dir": "relative/cache"}
    text = ("[Errno 13] Permission denied: '/srv/images/ward-7/patient-4711.png'; see relative/cache/trainers/x.log "
            "and /home/alice/notes; 0042_jdoe.dcm unreadable; metadata.jsonl line 2; model stabilityai/sd-turbo, 3/4 done, and/or 1.5 x")
    out = scrub(text, node)
    for leak in ("ward-7", "4711", "alice", "jdoe", "relative/cache", "x.log"):
        assert leak not in out, out
    for kept in ("Permission denied", "metadata.jsonl line 2", "stabilityai/sd-turbo", "3/4 done", "and/or", "1.5 x"):
        assert kept in out, out


def _prepare(node_config: dict, caplog) -> tuple[str, str]:
    """The real ClientApp's prepare on this node: (what reaches the coordinator, the node's log)."""

    from app.client_app import app

    msg = Message(content=compat.getpropertiesins_to_recorddict(GetPropertiesIns({})), dst_node_id=5,
                  message_type=MessageTypeLegacy.GET_PROPERTIES)
    ctx = Context(run_id=1, node_id=5, node_config={"org": "clinic-a"} | node_config, state=RecordDict(),
                  run_config=with_defaults({}))
    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = app(message=msg, context=ctx)
    assert reply.has_error()
    return reply.error.reason, caplog.text


def test_a_data_error_reaches_the_coordinator_without_names(tmp_path, caplog):
    ward = tmp_path / "ward-7"
    ward.mkdir()
    (ward / "metadata.jsonl").write_text('{"file_name": "patient-4711.png", "text": "a scan"}\n')
    reason, node_log = _prepare({"data-dir": str(ward), "warm-trainer": False}, caplog)
    assert reason.startswith("DataError: metadata.jsonl line 1 names a file that is not in the data folder"), reason
    assert "4711" not in reason and "ward-7" not in reason
    assert "patient-4711.png" in node_log and str(ward) in node_log  # the organisation's own log has them


def test_an_unexpected_error_reaches_the_coordinator_without_a_path(tmp_path, caplog):
    """A cache folder that is a file: Python's own OSError names the path; the coordinator gets none."""
    cache = tmp_path / "cache-of-patient-4711"
    cache.write_text("not a folder")
    reason, node_log = _prepare({"data-dir": str(tmp_path), "cache-dir": str(cache)}, caplog)
    assert reason.startswith(("NotADirectoryError: ", "FileExistsError: ")), reason
    assert "4711" not in reason and str(tmp_path) not in reason and "withheld" in reason, reason
    assert str(cache) in node_log and "Traceback" in node_log
    # The negative control: Flower alone forwards str(exception), path and all.
    bare = ClientApp(client_fn=lambda ctx: __import__("app.client_app").client_app.LoraClient(ctx).to_client())

    msg = Message(content=compat.getpropertiesins_to_recorddict(GetPropertiesIns({})), dst_node_id=5,
                  message_type=MessageTypeLegacy.GET_PROPERTIES)
    with pytest.raises(OSError) as raised:
        bare(message=msg, context=Context(run_id=1, node_id=5, node_config={"org": "clinic-a", "data-dir": str(tmp_path),
                                                                            "cache-dir": str(cache)},
                                          state=RecordDict(), run_config=with_defaults({})))
    assert "4711" in str(raised.value)
