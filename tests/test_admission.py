"""Admission: preparing data has its own bound (prepare-timeout), never holds up ready nodes, and a
failure tells a node that went away from one that is still encoding its images."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from flwr.app import Error, Message
from flwr.common import Code, GetPropertiesRes, Status
from flwr.common.constant import ErrorCode
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager

from app import admission
from app.admission import Admission, RunFailed
from app.config import RunConfig
from conftest import with_defaults
from test_private_metrics import _server_identity  # noqa: F401 (autouse: lets the test build replies)


class Clock:
    """Admission's clock in these tests: time passes only when admission or a grid sleeps, so every
    bound below is exact whatever the machine's load (a real clock on a busy CI machine is not)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


CLOCK = Clock()


class PrepareGrid:
    """The Grid calls admission makes, against nodes that answer `prepare` after `delay[node]`
    seconds, never (no delay), or go offline when asked (`leave`). Message ids as Flower's: the
    message's object id."""

    def __init__(self, orgs: dict[int, str], delay: dict[int, float], leave: tuple[int, ...] = (),
                 fail: dict[int, str] | None = None) -> None:
        self.orgs, self.delay, self.leave, self.fail = dict(orgs), dict(delay), leave, fail or {}
        self.online = set(orgs)
        self.run = SimpleNamespace(run_id=1)
        self.sent: dict[str, tuple[Message, float]] = {}
        self.pulled: set[str] = set()

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, name=self.orgs[n]) for n in sorted(self.online)]

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent[msg.metadata.message_id] = (msg, CLOCK.monotonic())
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id in self.leave:
                self.online.discard(msg.metadata.dst_node_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            msg, sent = self.sent[mid]
            nid = msg.metadata.dst_node_id
            if mid in self.pulled or nid not in self.online or nid not in self.delay:
                continue
            if CLOCK.monotonic() - sent >= self.delay[nid]:
                self.pulled.add(mid)
                if nid in self.fail:  # what a SuperNode sends back when the ClientApp raises
                    replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=self.fail[nid]),
                                           reply_to=msg))
                    continue
                res = GetPropertiesRes(Status(Code.OK, ""), {"org": self.orgs[nid], "num-train": 10,
                                                             "num-heldout": 2, "skipped-images": 0})
                replies.append(Message(compat.getpropertiesres_to_recorddict(res), reply_to=msg))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # Flower's: push, then pull until timeout
        ids, end, out = list(self.push_messages(messages)), CLOCK.monotonic() + timeout, []
        while ids and CLOCK.monotonic() < end:
            got = self.pull_messages(ids)
            out += got
            ids = [i for i in ids if i not in {m.metadata.reply_to_message_id for m in got}]
            CLOCK.sleep(0.01)
        return out


ORGS = {1: "org-1", 2: "org-2", 3: "org-3"}


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch):
    monkeypatch.setattr(admission, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(admission, "time", CLOCK)  # app/admission.py reads only monotonic() and sleep()


def _admission(grid, **settings) -> Admission:
    cfg = RunConfig.from_flower(with_defaults({"min-nodes": 3} | settings))
    return Admission(grid, SimpleClientManager(), cfg, {})


def test_preparing_is_bounded_by_prepare_timeout_not_node_wait_timeout():
    grid = PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.6})  # org-3 encodes its images for 0.6 s
    ready = _admission(grid, **{"node-wait-timeout": 0.2, "prepare-timeout": 5}).participants(1)
    assert sorted(p.node_id for p in ready) == [1, 2, 3]


def test_a_node_that_went_away_and_a_node_still_encoding_are_told_apart():
    grid = PrepareGrid(ORGS, delay={1: 0.0}, leave=(3,))  # org-2 never answers in time; org-3 leaves
    t0 = CLOCK.monotonic()
    with pytest.raises(RunFailed) as err:
        _admission(grid, **{"node-wait-timeout": 0.2, "prepare-timeout": 0.5}).participants(1)
    message = str(err.value)
    assert CLOCK.monotonic() - t0 >= 0.5  # waited for org-2's preparation, not only node-wait-timeout
    assert re.match(r"round 1: 1 of min-nodes=3 nodes ready after \d+ s \(ready: \['org-1'\]\)", message), message
    assert "org-2: online, but no answer to prepare within prepare-timeout=0.5 s" in message
    assert "still encoding its images" in message and "raise prepare-timeout" in message
    assert "org-3: went offline before answering prepare" in message


def test_a_node_joining_mid_run_does_not_hold_up_the_ready_ones():
    grid = PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.0})
    adm = _admission(grid, **{"prepare-timeout": 60})
    assert len(adm.participants(1)) == 3
    grid.orgs[4] = "org-4"
    grid.online.add(4)
    grid.delay[4] = 0.3  # a first-time encoding
    t0 = CLOCK.monotonic()
    assert sorted(p.node_id for p in adm.participants(2)) == [1, 2, 3]
    assert CLOCK.monotonic() - t0 < 0.2
    CLOCK.sleep(0.35)
    assert sorted(p.node_id for p in adm.participants(3)) == [1, 2, 3, 4]
    assert adm.counts[4] == 10


def test_a_node_whose_preparation_fails_is_named_and_does_not_hold_the_run():
    # It is asked again on every poll, and each answer takes a few polls to come.
    grid = PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.05}, fail={3: "DataError: /data holds 0 usable image(s)"})
    t0 = CLOCK.monotonic()
    with pytest.raises(RunFailed, match=r"2 of min-nodes=3 .*org-3: DataError: /data holds 0 usable image"):
        _admission(grid, **{"node-wait-timeout": 0.3, "prepare-timeout": 60}).participants(1)
    assert CLOCK.monotonic() - t0 < 5  # node-wait-timeout, not prepare-timeout: it answered, with an error
    # With min-nodes met, the run goes on without it.
    assert sorted(p.node_id for p in _admission(PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.05}, fail={3: "x"}),
                                                   **{"min-nodes": 2, "prepare-timeout": 60}).participants(1)) == [1, 2]


def test_a_node_that_refused_the_apps_bundle_is_asked_once_and_named():
    # What docker/bundle_guard.py's refusal looks like when it reaches the ServerApp.
    refusal = ("<class '__main__.BundleRefused'>:<'org-3 refused app bundle sha256:" + "ab" * 32 + ": not in its "
               "approved list. To let it run, the organisation runs `make approve-bundle FAB=" + "ab" * 32 + "`'>")
    grid = PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.0}, fail={3: refusal})
    with pytest.raises(RunFailed, match=r"2 of min-nodes=3 .*node 3 refused: org-3: .*make approve-bundle FAB=(ab){32}"):
        _admission(grid, **{"node-wait-timeout": 0.3, "prepare-timeout": 60}).participants(1)
    assert [m.metadata.dst_node_id for m, _ in grid.sent.values()].count(3) == 1


def test_the_first_round_waits_for_every_node_still_preparing():
    """So that every connected organisation trains from round 1 and round 0's held-out loss covers
    them all: otherwise later figures would cover other organisations than round 0's."""
    grid = PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.3})
    assert sorted(p.node_id for p in _admission(grid, **{"min-nodes": 2, "prepare-timeout": 60}).participants(1)) == [1, 2, 3]


class NamelessGrid(PrepareGrid):
    """Nodes without a registered name: how Flower's Simulation Engine creates every node, and what
    a key registered with plain `flwr supernode register` gets. Each prepare reply names its org."""

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, name="") for n in sorted(self.online)]


def test_nameless_nodes_are_named_by_their_own_config_only_in_a_simulation():
    # A deployment refuses them, whatever they claim (the ServerApp's `simulated` comes from the grid
    # type Flower hands it, never from a run setting: app/server_app.py).
    with pytest.raises(RunFailed, match="0 of min-nodes=3 .*registered without an organisation name"):
        _admission(NamelessGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.0}), **{"node-wait-timeout": 0.2}).participants(1)

    cfg = RunConfig.from_flower(with_defaults({"min-nodes": 2, "node-wait-timeout": 0.3}))
    org_of: dict[int, str] = {}
    adm = Admission(NamelessGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.0}), SimpleClientManager(), cfg, org_of, simulated=True)
    assert sorted(p.node_id for p in adm.participants(1)) == [1, 2, 3]
    assert org_of == ORGS
    # Two simulated nodes claiming one organisation: the second one is refused.
    twins = NamelessGrid({1: "org-1", 2: "org-1", 3: "org-3"}, delay={1: 0.0, 2: 0.05, 3: 0.0})
    adm = Admission(twins, SimpleClientManager(), cfg, {}, simulated=True)
    assert sorted(p.node_id for p in adm.participants(1)) == [1, 3]
    assert adm.refused == {2: "another simulated node is already 'org-1'"}


def test_fewer_than_three_participants_under_secagg_are_warned_about(caplog):
    """With two, each can subtract its own update from the average and read the other's."""
    import logging

    with caplog.at_level(logging.WARNING, logger="flwr"):
        _admission(PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0, 3: 0.0})).participants(1)
        assert "hides NOTHING" not in caplog.text
        _admission(PrepareGrid(ORGS, delay={1: 0.0, 2: 0.0}), **{"min-nodes": 2, "prepare-timeout": 0.1}).participants(1)
    assert "round 1: only 2 participants. With fewer than 3, secure aggregation hides NOTHING" in caplog.text
