"""What an organisation's node checks whatever the coordinator says: its SecAgg+ floor, and no names out.

The run's code and its settings come from the coordinator. These mods are the node's own rules,
from its own node settings (`--node-config`); they hold against a coordinator that states one
thing and sends another, though not against one that ships other code (only the organisation's
approval of the code it runs can).

`secagg_floor`, around Flower's secaggplus_mod (which trusts what the ServerApp relays):
- require-secagg=true: a training message without SecAgg+ configuration gets an error, never an
  unmasked update, whatever the run's `aggregation` says.
- min-peers (default 2): the node sends its masked update only when it holds key shares from at
  least min-peers other nodes, counted from what it received, never from the sample size the
  ServerApp states. Its pairwise masks are made with exactly those peers: with one, that peer (a
  node the coordinator runs, say) and the coordinator together unmask this node's update.
- the reconstruction threshold must be above half of the nodes holding shares (checked when the
  keys arrive, before any share leaves, and again at unmasking): otherwise two disjoint groups
  could each rebuild a different secret of the same node.
- at unmasking, no node may be listed both as active and as dropped, and this node not as dropped:
  for such a node the others would reveal both its mask seed and its mask key, which removes every
  mask from its update alone.

`without_names`, outermost: Flower sends str(exception) of a failing ClientApp to the coordinator.
This mod logs the whole error (traceback, file names) in the organisation's own log and replies
with the error's type and its message scrubbed of paths and file names.
"""

from __future__ import annotations

import re
from logging import ERROR
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from .config import ConfigError, NodeConfig

# This mod's own record of the round in progress (the node's Context state, kept between messages).
STATE = "fedlora.node-guard"


class Refused(RuntimeError):
    """The node refuses this message under its own node settings; the message says which and why."""


def secagg_floor(msg: Message, ctxt: Context, call_next) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    node = NodeConfig.from_flower(ctxt.node_config, ctxt.run_config)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if node.require_secagg:
            raise Refused(
                f"[{node.org}] refused a training message without SecAgg+: this organisation sends its update only "
                f"masked (node setting require-secagg=true). This run has aggregation="
                f"{ctxt.run_config.get('aggregation')!r}: start it with aggregation=\"secagg+\"")
        return call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        ctxt.state.config_records[STATE] = ConfigRecord({"threshold": int(configs[Key.THRESHOLD])})
        return call_next(msg, ctxt)
    record = ctxt.state.config_records.get(STATE)
    if record is None:
        raise Refused(f"[{node.org}] refused SecAgg+ stage {stage!r}: no setup stage of this round reached this node")
    nid = msg.metadata.dst_node_id
    if stage == Stage.SHARE_KEYS:
        holders = sorted(int(k) for k in configs if k != Key.STAGE)
        record["holders"] = holders
        _floor(node, "refused the SecAgg+ round before sharing its keys: the coordinator relayed the keys of",
               len(set(holders) - {nid}))
        _threshold(node, int(record["threshold"]), len(holders))
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        holders = set(_holders(node, record))
        received = set(configs[Key.SOURCE_LIST]) & holders - {nid}
        _floor(node, "refused to send its masked update: it received key shares from", len(received))
    elif stage == Stage.UNMASK:
        holders = _holders(node, record)
        _threshold(node, int(record["threshold"]), len(holders))
        active, dropped = set(configs[Key.ACTIVE_NODE_ID_LIST]), set(configs[Key.DEAD_NODE_ID_LIST])
        if active & dropped:
            raise Refused(
                f"[{node.org}] refused to unmask: node(s) {sorted(active & dropped)} are listed both as active and as "
                "dropped. Revealing both of their shares would let the coordinator remove every mask from their "
                "updates one by one. An honest ServerApp never sends this")
        if nid in dropped:
            raise Refused(f"[{node.org}] refused to unmask: this node is listed as dropped, yet it sent its masked "
                          "update. Revealing its mask key would unmask it. An honest ServerApp never sends this")
    return call_next(msg, ctxt)


def _holders(node: NodeConfig, record: ConfigRecord) -> list[int]:
    if "holders" not in record:
        raise Refused(f"[{node.org}] refused a SecAgg+ stage out of order: no key exchange of this round reached this node")
    return list(record["holders"])


def _floor(node: NodeConfig, what: str, others: int) -> None:
    if others < node.min_peers:
        raise Refused(
            f"[{node.org}] {what} {others} other node(s), fewer than its node setting min-peers={node.min_peers} (the "
            "sample size the coordinator states does not count). With so few, one of them and the coordinator "
            "could read this organisation's update. No update was sent")


def _threshold(node: NodeConfig, threshold: int, holders: int) -> None:
    if 2 * threshold <= holders:
        raise Refused(
            f"[{node.org}] refused the SecAgg+ round: its reconstruction threshold {threshold} is at or below half of "
            f"the {holders} nodes holding shares, so two disjoint groups of nodes could rebuild both secrets of one "
            "node and unmask its update. No update was sent")


# --- No names out --------------------------------------------------------------------------------

# What looks like a path: starts with /, ~/ or a drive letter, not inside a word (and/or, 1/2 and a
# model id such as org/model stay); and a file name with a data, model or log suffix, except the
# name every data folder uses for its captions (app/data.py's METADATA).
_PATH = re.compile(r"(?<![\w.~-])(?:~|[A-Za-z]:)?[/\\][^\s'\"`<>|]+")
_FILE = re.compile(r"(?<![^\s'\"`<>|/\\])(?!metadata\.jsonl\b)[^\s'\"`<>|/\\]+\.(?:png|jpe?g|webp|bmp|gif|tiff?|dcm|dicom|nii|nrrd|mha|jsonl|json|csv|tsv|txt"
                   r"|pt|pth|bin|safetensors|npz|npy|log|sock|lock|db|pem|key|zip|tar|gz)\b", re.I)


def scrub(text: str, node_config: Mapping[str, Any]) -> str:
    """`text` without the node's folders, paths or file names."""
    for key in ("data-dir", "cache-dir"):
        root = str(node_config.get(key, "")).rstrip("/")
        if len(root) > 1:
            text = re.sub(re.escape(root) + r"[^\s'\"]*", f"<{key}>", text)
    return _FILE.sub("<file>", _PATH.sub("<path>", text))


def without_names(msg: Message, ctxt: Context, call_next) -> Message:
    """Every error leaves the node as its type and a scrubbed message; the node's log keeps it whole."""
    try:
        return call_next(msg, ctxt)
    except Exception as err:  # noqa: BLE001 - whatever fails, Flower would forward str(err)
        from .data import DataError

        org = ctxt.node_config.get("org", "this node")
        detail = getattr(err, "detail", str(err))
        log(ERROR, "[%s] %s message failed: %s: %s", org, msg.metadata.message_type, type(err).__name__, detail,
            exc_info=not isinstance(err, (Refused, ConfigError, DataError)))
        reason = f"{type(err).__name__}: {scrub(str(err), ctxt.node_config)}"
        if reason != f"{type(err).__name__}: {err}" or detail != str(err):
            reason += " (names and paths withheld: the organisation's node log has them)"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
