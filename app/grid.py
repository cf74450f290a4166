"""The ServerApp's view of the grid: replies collected as they arrive, a timeout on every stage,
and the wall time of each stage.

Flower 1.41's `Grid.send_and_receive` pushes a stage's messages, then pulls for replies every 3 s
(flwr/superlink/grid/http_grid.py): each stage waits up to 3 s after its last reply arrived, and a
SecAgg+ round has four stages. `FastGrid.send_and_receive` does the same with the Grid's public
`push_messages`/`pull_messages` every POLL_SECONDS, with Flower's result: the replies that arrived
before the timeout, in the order they were pulled (and one Flower can miss: it pulls only every
3 s, so a reply that lands after its last pull before the timeout is dropped). The ServerApp hands
it to every workflow that sends stages: SecAgg+'s four, Flower's plain fit and evaluate.

Every reply passes `check` (app/aggregate.py's RoundStrategy.check_reply) as it arrives, before any
workflow reads it: a reply it refuses is handed on as that node's error reply, so Flower's workflows
count it as a node that dropped out (SecAgg+ reconstructs its masks) instead of summing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

# One pull is one small request to the SuperLink; at 0.1 s a stage ends at most 0.1 s after its
# last reply, for about 10 requests a second while a stage is open.
POLL_SECONDS = 0.1


def stage_name(messages: list[Message]) -> str:
    """What a batch of messages is: a SecAgg+ stage ("setup", "share_keys", "collect_masked_vectors",
    "unmask"), or Flower's message type ("train", "evaluate", "query")."""
    if not messages:
        return "none"
    msg = messages[0]
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return str(configs[Key.STAGE])
    return msg.metadata.message_type


class FastGrid:
    """Wraps the ServerApp's Grid; everything but send_and_receive passes through."""

    def __init__(self, grid, timeout: float, poll_seconds: float = POLL_SECONDS,
                 check: Callable[[str, Message], str | None] | None = None) -> None:
        self._grid, self._timeout, self._poll = grid, timeout, poll_seconds
        self._check = check  # (stage, reply) -> why the reply must not count, or None
        self._stages: list[tuple[str, float]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull until every reply is in or `timeout` (default: the run's) has passed.

        No stage waits forever for a lost node: Flower's None ("no timeout") takes the run's."""
        messages = list(messages)
        name, t0 = stage_name(messages), time.monotonic()
        # Flower logs a message it could not push (None); no reply to it can come.
        sent = dict(zip(self._grid.push_messages(messages), messages))
        waiting = {mid for mid in sent if mid}
        end = time.monotonic() + (timeout or self._timeout)
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            for msg in got:
                checked = self._checked(name, sent.get(msg.metadata.reply_to_message_id), msg)
                if checked is not None:
                    replies.append(checked)
            waiting -= {msg.metadata.reply_to_message_id for msg in got}
            left = end - time.monotonic()
            if not waiting or left <= 0:
                break
            time.sleep(min(self._poll, left))
        self._stages.append((name, time.monotonic() - t0))
        return replies

    def _checked(self, stage: str, instruction: Message | None, reply: Message) -> Message | None:
        if instruction is None:  # a reply to nothing this stage sent: not the workflow's to read
            return None
        why = self._check(stage, reply) if self._check else None
        if not why:
            return reply
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"refused by the coordinator: {why}"), reply_to=instruction)

    def take_stages(self) -> dict[str, float]:
        """Wall seconds of each stage since the last call, by stage name (repeats add up)."""
        out: dict[str, float] = {}
        for name, seconds in self._stages:
            out[name] = out.get(name, 0.0) + seconds
        self._stages.clear()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
