"""The ServerApp's FastGrid against Flower's own send_and_receive, on the same replies.

Nodes answer on a fake clock, so the tests say exactly when each call returns without waiting for
it: Flower's loop (flwr/superlink/grid/http_grid.py, run unchanged with its `time` pointed at the
fake clock) returns on its 3 s beat, FastGrid within one poll of the last reply; both return the
same replies, and both stop at the timeout.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from app import grid as fast_grid
from app.grid import POLL_SECONDS, FastGrid
from test_private_metrics import _nodes, _run_secagg
from test_secagg import _updates


class Clock:
    """Stands in for the `time` module: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class ScriptedGrid:
    """Flower's Grid contract: node n's reply can be pulled `delays[n]` seconds after its message was
    pushed (never, for None), once, as the SuperLink hands each reply out once."""

    def __init__(self, clock: Clock, delays: dict[int, float | None]) -> None:
        self.clock, self.delays = clock, delays
        self.replies: dict[str, tuple[float | None, Message]] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            delay = self.delays[msg.metadata.dst_node_id]
            self.replies[mid] = (None if delay is None else self.clock.now + delay, Message(RecordDict(), reply_to=msg))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [mid for mid in message_ids if mid in self.replies and self.replies[mid][0] is not None
                 and self.replies[mid][0] <= self.clock.now]
        return [self.replies.pop(mid)[1] for mid in ready]


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(fast_grid, "time", clock)
    monkeypatch.setattr(http_grid, "time", clock)
    return clock


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """What a ServerApp process has set when it creates messages."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _messages(nodes) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=nid, message_type="train") for nid in nodes]


def _flower(clock: Clock, delays: dict, timeout: float | None) -> tuple[set[int], float]:
    """Flower 1.41's send_and_receive on a fresh script: (who replied, when it returned)."""
    clock.now = 0.0
    replies = HttpGrid.send_and_receive(ScriptedGrid(clock, delays), _messages(delays), timeout=timeout)
    return {m.metadata.src_node_id for m in replies}, clock.now


def _fast(clock: Clock, delays: dict, timeout: float | None, default: float = 1800.0) -> tuple[set[int], float]:
    clock.now = 0.0
    replies = FastGrid(ScriptedGrid(clock, delays), default).send_and_receive(_messages(delays), timeout=timeout)
    return {m.metadata.src_node_id for m in replies}, clock.now


def test_replies_are_collected_as_they_arrive(clock):
    delays = {11: 0.3, 12: 0.5, 13: 1.2}
    fast, fast_done = _fast(clock, delays, timeout=60)
    flower, flower_done = _flower(clock, delays, timeout=60)
    assert fast == flower == set(delays)
    assert 1.2 <= fast_done <= 1.2 + POLL_SECONDS + 1e-9
    assert flower_done == 3.0  # what every stage of a round paid before


def test_the_timeout_is_honoured_with_flowers_result(clock):
    delays = {11: 0.2, 12: None, 13: 4.0}  # 12 never answers; 13 answers after the timeout
    fast, fast_done = _fast(clock, delays, timeout=3.5)
    flower, _ = _flower(clock, delays, timeout=3.5)
    assert fast == flower == {11}
    assert 3.5 <= fast_done <= 3.5 + 1e-9  # never sleeps past the deadline


def test_a_reply_before_the_timeout_is_kept(clock):
    """Where they differ: Flower pulls at 0 s and 3 s only, so with a 2.5 s timeout it drops the
    reply that arrived at 0.2 s."""
    delays = {11: 0.2, 12: None}
    assert _fast(clock, delays, timeout=2.5)[0] == {11}
    assert _flower(clock, delays, timeout=2.5)[0] == set()


def test_no_stage_waits_forever(clock):
    """Flower's None means 'wait forever'; here it means the run's round-timeout."""
    fast, done = _fast(clock, {11: 0.2, 12: None, 13: 4.0}, timeout=None, default=5.0)
    assert fast == {11, 13} and 5.0 <= done <= 5.0 + 1e-9


def test_a_reply_in_time_is_never_missed(clock):
    """Replies landing between polls, up to the deadline itself, are all collected."""
    delays = {nid: d for nid, d in zip(range(1, 40), np.linspace(0.0, 3.0, 39))}
    fast, done = _fast(clock, delays, timeout=3.0)
    assert fast == set(delays) and done <= 3.0 + 1e-9


def test_every_secagg_stage_goes_through_it_and_is_timed():
    """Flower's real SecAgg+ workflow and the app's mods, in process, through FastGrid: the round
    aggregates as it does without it, and each of the four stages has its wall time."""
    wrapped = []
    checked = []

    def strategy_check(stage, reply):
        checked.append(stage)

    def wrap(grid):
        wrapped.append(FastGrid(grid, 60.0, check=strategy_check))
        return wrapped[0]

    strategy, replies = _run_secagg({}, _nodes(3, seed=5), _updates(3, 1e-4, 50, seed=5), wrap_grid=wrap)
    assert strategy.fit is not None and not any(r.has_error() for r in replies)
    stages = wrapped[0].take_stages()
    assert list(stages) == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert all(s >= 0 for s in stages.values())
    assert wrapped[0].take_stages() == {}  # taken once
    assert sorted(set(checked)) == sorted(stages) and len(checked) == 4 * 3  # every reply of every stage
