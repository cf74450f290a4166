"""The ServerApp's view of the grid: replies collected as they arrive, a timeout on every stage,
and the wall time of each stage.

Flower 1.41's `Grid.send_and_receive` pushes a stage's messages, then pulls for replies every 3 s
(flwr/superlink/grid/http_grid.py): each stage waits up to 3 s after its last reply arrived, and a
SecAgg+ round has four stages. `FastGrid.send_and_receive` does the same with the Grid's public
`push_messages`/`pull_messages` every POLL_SECONDS, with Flower's result: the replies that arrived
before the timeout, in the order they were pulled (and one Flower can miss: it pulls only every
3 s, so a reply that lands after its last pull before the timeout is dropped). The ServerApp hands
it to every workflow that sends stages: SecAgg+'s four, Flower's plain fit and evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
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

    def __init__(self, grid, timeout: float, poll_seconds: float = POLL_SECONDS) -> None:
        self._grid, self._timeout, self._poll = grid, timeout, poll_seconds
        self._stages: list[tuple[str, float]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull until every reply is in or `timeout` (default: the run's) has passed.

        No stage waits forever for a lost node: Flower's None ("no timeout") takes the run's."""
        messages = list(messages)
        name, t0 = stage_name(messages), time.monotonic()
        # Flower logs a message it could not push (None); no reply to it can come.
        waiting = {mid for mid in self._grid.push_messages(messages) if mid}
        end = time.monotonic() + (timeout or self._timeout)
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {msg.metadata.reply_to_message_id for msg in got}
            left = end - time.monotonic()
            if not waiting or left <= 0:
                break
            time.sleep(min(self._poll, left))
        self._stages.append((name, time.monotonic() - t0))
        return replies

    def take_stages(self) -> dict[str, float]:
        """Wall seconds of each stage since the last call, by stage name (repeats add up)."""
        out: dict[str, float] = {}
        for name, seconds in self._stages:
            out[name] = out.get(name, 0.0) + seconds
        self._stages.clear()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
