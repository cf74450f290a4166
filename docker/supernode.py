#!/usr/bin/env python3
"""`flower-supernode` that answers every message it took: the SuperNode as the image and the tests start it.

    supernode.py [flower-supernode's arguments]

Flower 1.41's SuperNode loop pulls one message, then pushes "the replies": it waits until the node
state holds at least one reply, pushes those it finds and pulls again. It assumes the first reply
to appear is the one to the message just pulled. A reply to a message of a run that has ended
breaks that. Such a reply appears when the SuperLink goes away while the node fetches a message's
content and the run has been marked failed by the time the SuperLink is back: Flower's loop logs
"Ignoring message" but leaves the message in the state, since the RunNotRunningException it catches
is a BaseException that skips its own clean-up. The ClientApp still answers it. The next message
pulled, e.g. the next run's first one, is then followed by a push of that stale reply (which the
SuperLink refuses), and its own reply stays in the state: the node never answers. Each later
message would be answered one message late, so the node is lost to every run until restarted
(tests/test_faults.py: the run after a SuperLink outage waited for one organisation's reply).

The fix: after Flower's push, if the reply to the message just pulled was not among those pushed,
wait for it and push it too. Flower's loop, its retries and its logs are otherwise unchanged.
The seam is the two module functions the loop calls by name; tests/test_supernode.py pins them.
"""

from __future__ import annotations

import sys
from logging import INFO

from flwr.common.logger import log
from flwr.supernode import start_client_internal as loop

_pull_and_store_message = loop._pull_and_store_message
_push_messages = loop._push_messages
# The message pulled last that the ClientApp will answer ("" when the last pull stored none).
_awaited = {"message_id": ""}


def pull_and_store_message(**kwargs):
    """Flower's pull, noting the message it took (kept in the state when it returns a run ID)."""
    receive, received = kwargs["receive"], []

    def noting_receive():
        got = receive()
        if got is not None:
            received.append(got[0].metadata.message_id)
        return got

    run_id = _pull_and_store_message(**{**kwargs, "receive": noting_receive})
    _awaited["message_id"] = received[-1] if run_id is not None and received else ""
    return run_id


def push_messages(**kwargs):
    """Flower's push, again until the reply to the message pulled last has been pushed."""
    send, answered = kwargs["send"], set()

    def noting_send(message, *args):
        answered.add(message.metadata.reply_to_message_id)
        return send(message, *args)

    while True:
        _push_messages(**{**kwargs, "send": noting_send})
        awaited = _awaited["message_id"]
        if not awaited or awaited in answered:
            return
        log(INFO, "That reply answered an earlier message; waiting for the reply to message %s", awaited)


def main() -> None:
    loop._pull_and_store_message = pull_and_store_message
    loop._push_messages = push_messages
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
