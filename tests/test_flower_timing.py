"""The Flower timings the Docker tests derive their windows from (tests/test_faults.py,
tests/test_stack.py), pinned: a Flower upgrade that moves them fails here, not as a flaky timeout."""

from __future__ import annotations

import inspect


def test_a_supernode_heartbeats_at_flowers_default_interval_and_is_offline_after_patience_misses():
    from flwr.common import constant
    from flwr.server.superlink.linkstate import sql_linkstate
    from flwr.supernode import fleet_http_connection

    assert (constant.HEARTBEAT_DEFAULT_INTERVAL, constant.HEARTBEAT_PATIENCE) == (30, 2)
    # The node asks for the default interval (both at activation and in every heartbeat)...
    assert inspect.getsource(fleet_http_connection).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") >= 2
    # ...and the SuperLink's state (the stack runs it with --database) allows PATIENCE intervals.
    assert inspect.getsource(sql_linkstate).count("HEARTBEAT_PATIENCE * heartbeat_interval") >= 1
