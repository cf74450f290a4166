"""The SuperNode launcher (docker/supernode.py): a node answers every message it took, even after a
reply to a run that ended (the run after a SuperLink outage, tests/test_faults.py).

Flower's own push loop and node state run here; only the network (`send`, `push_object`) is a
recorder. The fault test shows the same on the Compose stack.
"""

from __future__ import annotations

import inspect
import threading
import time
from importlib.metadata import entry_points

from flwr.app import Message, Metadata, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal as loop
from flwr.supernode.nodestate import NodeStateFactory

from federation import REPO, load_module

launcher = load_module("supernode_launcher", REPO / "docker" / "supernode.py")


def instruction(run_id: int) -> Message:
    """The coordinator's message to node 7, as the node pulled it (the SuperLink set its ID)."""
    message = Message(metadata=Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=7,
                                        reply_to_message_id="", group_id="3", created_at=time.time(),
                                        ttl=3600, message_type="train"), content=RecordDict())
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def node_with_stale_reply():
    """A node state holding the ClientApp's reply to a message of a run that has ended."""
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())  # as flower-supernode makes them
    state, store = factory.state(), factory.objectstore_factory.store()
    ended, current = instruction(1), instruction(2)
    loop._insert_message(Message(RecordDict(), reply_to=ended), state, store)
    return state, store, ended, current


def push_with(push, state, store, current: Message) -> list[str]:
    """Run `push` while the ClientApp's reply to `current` arrives half a second later; the messages
    its pushes answered, in order."""
    answered = []

    def send(message, object_tree, runtime):
        answered.append(message.metadata.reply_to_message_id)
        return set(), "session"

    def reply_later():
        time.sleep(0.5)
        loop._insert_message(Message(RecordDict(), reply_to=current), state, store)

    threading.Thread(target=reply_later, daemon=True).start()
    push(state=state, object_store=store, send=send, push_object=lambda *a: None)
    return answered


def test_the_reply_to_the_message_just_pulled_is_pushed_after_a_stale_one():
    state, store, ended, current = node_with_stale_reply()
    launcher._awaited["message_id"] = current.metadata.message_id
    try:
        answered = push_with(launcher.push_messages, state, store, current)
    finally:
        launcher._awaited["message_id"] = ""
    assert answered == [ended.metadata.message_id, current.metadata.message_id]
    assert not state.get_messages_legacy(is_reply=True)


def test_flowers_own_push_strands_the_reply_behind_a_stale_one():
    """What the launcher fixes, shown on Flower 1.41 itself: if this fails, Flower changed its loop
    and the launcher may no longer be needed (or may no longer fit)."""
    state, store, ended, current = node_with_stale_reply()
    answered = push_with(loop._push_messages, state, store, current)
    assert answered == [ended.metadata.message_id]
    time.sleep(1)
    stranded = state.get_messages_legacy(is_reply=True)
    assert [m.metadata.reply_to_message_id for m in stranded] == [current.metadata.message_id]


def test_the_seam_the_launcher_relies_on():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "flower-supernode"]
    assert script.value == "flwr.supernode.cli:flower_supernode"
    assert "from flwr.supernode.cli import flower_supernode" in inspect.getsource(launcher.main)
    # The loop calls both by their module names, with these keywords, once a pull returned a run.
    body = inspect.getsource(loop.start_client_internal)
    assert "run_id = _pull_and_store_message(" in body and "_push_messages(" in body
    assert "receive=receive" in body and "send=send" in body
    assert set(inspect.signature(loop._push_messages).parameters) == {"state", "object_store", "send", "push_object"}
    assert "receive" in inspect.signature(loop._pull_and_store_message).parameters
    # A run that ended while a message's content was fetched skips Flower's clean-up of the message.
    assert not issubclass(loop.RunNotRunningException, Exception)


def test_the_image_and_the_stack_start_the_supernode_through_the_launcher():
    assert 'supernode.py --superlink "$SUPERLINK_ADDRESS"' in (REPO / "docker" / "supernode.sh").read_text()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert dockerfile.count("docker/supernode.py docker/preflight.py /usr/local/bin/") == 2  # superlink and app images
    assert (REPO / "docker" / "supernode.py").stat().st_mode & 0o111  # run by name from PATH
