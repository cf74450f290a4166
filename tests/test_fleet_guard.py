"""The Fleet guard (docker/superlink.py): one organisation cannot forge the coordinator's messages.

Flower 1.41's Fleet API stores a node's push without `reply_to` as an instruction from the
SuperLink to whichever node it names. The guard refuses such pushes before LinkState sees them.
Here: the Flower internals it relies on (a Flower upgrade that moves them fails these tests), every
refusal on Flower's own app in process, and on a real TLS federation a registered node's forged
instruction to another node, refused with the guard and delivered without it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import time
from base64 import b64encode
from importlib.metadata import entry_points

import pytest

from federation import REPO, LocalFederation

spec = importlib.util.spec_from_file_location("superlink_launcher", REPO / "docker" / "superlink.py")
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)


# --- The seam, pinned ----------------------------------------------------------------------------

def test_the_guard_runs_first_in_flowers_middleware_and_before_node_authentication(monkeypatch):
    from flwr.superlink import main
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware

    monkeypatch.setattr(guard.extensions, "get_middleware", guard.extensions.get_middleware)  # undone after
    guard.install()
    guard.install()  # idempotent: the harness and the image may both install it
    order = [m.cls for m in main._get_middleware()]
    assert order[0] is guard.FleetGuard and order.count(guard.FleetGuard) == 1
    # Flower parses and authenticates after the guard: the guard parses and authenticates itself.
    assert order.index(ProtobufTranslationMiddleware) < order.index(NodeAuthMiddleware)
    assert "authenticate_node" in inspect.getsource(NodeAuthMiddleware.dispatch)


def test_the_launcher_starts_what_flower_superlink_starts():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "flower-superlink"]
    assert script.value == "flwr.superlink.cli:flower_superlink"
    assert "from flwr.superlink.cli import flower_superlink" in inspect.getsource(guard.main)


def test_flowers_push_route_and_its_only_other_fleet_transport():
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.routers.fleet.router import router
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    pushes = [k for k, v in PROTOBUF_REQUEST_TYPES.items() if v is PushMessagesRequest]
    assert pushes == [("POST", "/v1/fleet/push-messages")]
    assert "/v1/fleet/push-messages" in {r.path for r in router.routes}
    # The legacy gRPC Fleet servicer starts only on this variable; the launcher refuses it.
    assert "FLWR_INTERNAL_GRPC_FLEET_API" in inspect.getsource(SuperLinkLifespan.startup)


def test_the_image_and_the_stack_start_the_superlink_through_the_launcher():
    from test_compose import compose_config

    assert compose_config("compose.yaml")["services"]["superlink"]["command"][0] == "superlink.py"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    superlink_target = dockerfile.split("AS superlink", 1)[1].split("\nFROM ", 1)[0]
    assert "COPY docker/superlink.py /usr/local/bin/" in superlink_target
    assert (REPO / "docker" / "superlink.py").stat().st_mode & 0o111  # run by name from PATH


def test_the_launcher_refuses_to_start_flowers_grpc_fleet_api():
    result = subprocess.run([sys.executable, str(REPO / "docker" / "superlink.py"), "--insecure"],
                            env={"FLWR_INTERNAL_GRPC_FLEET_API": "1", "PATH": ""}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "FLWR_INTERNAL_GRPC_FLEET_API=1" in result.stderr, result.stderr


def make_message(run_id: int, src: int, dst: int, reply_to: str = ""):
    """A message as a SuperNode pushes it: id = its object id, with its object tree."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    meta = Metadata(run_id=run_id, message_id="", src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="", created_at=now().timestamp(), ttl=600, message_type="train")
    message = Message(metadata=meta, content=RecordDict({"c": ConfigRecord({"forged": reply_to == ""})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    return message, get_object_tree(message)


@pytest.mark.parametrize("database", [":flwr-in-memory:", ":memory:"])
def test_instruction_destination_reads_both_of_flowers_linkstores(database):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

    state = get_objectstore_linkstate_factories(database, get_federation_manager())[1].state()
    node = state.create_node("aid", "org", b"key", 30)
    state.activate_node(node, 30)
    run = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    instruction, _ = make_message(run, SUPERLINK_NODE_ID, node)
    assert state.store_message_ins(instruction)
    assert guard.instruction_destination(state, instruction.metadata.message_id) == node
    assert guard.instruction_destination(state, "0" * 64) is None


# --- Every refusal, on Flower's own app in process -----------------------------------------------

@pytest.fixture
def superlink_app(monkeypatch):
    """Flower's SuperLink app with the guard, an in-memory LinkState, two nodes and a run."""
    from fastapi.testclient import TestClient

    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.superlink.main import create_app
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    monkeypatch.setattr(guard.extensions, "get_middleware", guard.extensions.get_middleware)  # undone after
    guard.install()
    app = create_app()
    state = app.state.linkstate_factory.state()
    keys, nodes = {}, {}
    for name in ("mallory", "victim"):
        keys[name] = generate_key_pairs()
        nodes[name] = state.create_node("aid", name, public_key_to_bytes(keys[name][1]), 30)
        state.activate_node(nodes[name], 30)
    run = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    instructions = {}
    for name, node in nodes.items():
        instructions[name], _ = make_message(run, SUPERLINK_NODE_ID, node)
        assert state.store_message_ins(instructions[name])
    return {"client": TestClient(app), "state": state, "keys": keys, "nodes": nodes, "run": run,
            "instructions": instructions}


def push(app, sender: str, message, object_tree, key_of: str | None = None):
    """POST /v1/fleet/push-messages as `sender`, signed like Flower's SuperNode signs (by `key_of`'s key)."""
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    private, public = app["keys"][key_of or sender]
    timestamp = now().isoformat()
    body = PushMessagesRequest(node=Node(node_id=app["nodes"][sender]), messages_list=[message_to_proto(message)],
                               message_object_trees=[object_tree]).SerializeToString()
    return app["client"].post("/v1/fleet/push-messages", content=body, headers={
        "content-type": "application/protobuf", "flwr-timestamp": timestamp,
        "flwr-public-key": b64encode(public_key_to_bytes(public)).decode(),
        "flwr-signature": b64encode(sign_message(private, timestamp.encode())).decode()})


def test_forged_pushes_are_refused_before_linkstate(superlink_app):
    from flwr.common.constant import SUPERLINK_NODE_ID

    app, run, nodes, ins = superlink_app, superlink_app["run"], superlink_app["nodes"], superlink_app["instructions"]
    stored = app["state"].num_message_ins()
    cases = {
        # an instruction "from the coordinator" to another organisation
        "replies to nothing": make_message(run, nodes["mallory"], nodes["victim"]),
        "claiming to come from node 1": make_message(run, SUPERLINK_NODE_ID, nodes["victim"]),
        # a reply in another organisation's name, to that organisation's instruction
        f"claiming to come from node {nodes['victim']}":
            make_message(run, nodes["victim"], SUPERLINK_NODE_ID, ins["victim"].metadata.message_id),
        f"addressed to node {nodes['victim']}":
            make_message(run, nodes["mallory"], SUPERLINK_NODE_ID, ins["victim"].metadata.message_id),
        "unknown or expired": make_message(run, nodes["mallory"], SUPERLINK_NODE_ID, "0" * 64),
    }
    for why, (message, tree) in cases.items():
        response = push(app, "mallory", message, tree)
        assert response.status_code == 403 and why in response.json()["detail"], (why, response.text)
    assert app["state"].num_message_ins() == stored
    # Signed with another node's key than the node it names: Flower's own check, run first.
    message, tree = make_message(run, nodes["victim"], SUPERLINK_NODE_ID, ins["victim"].metadata.message_id)
    response = push(app, "victim", message, tree, key_of="mallory")
    assert response.status_code == 401 and "authentication" in response.text
    # The victim received only the coordinator's instruction.
    assert [m.metadata.message_id for m in app["state"].get_message_ins(nodes["victim"], None)] == [
        ins["victim"].metadata.message_id]


def test_a_reply_to_the_nodes_own_instruction_passes_the_guard(superlink_app):
    app = superlink_app
    message, tree = make_message(app["run"], app["nodes"]["mallory"], 1, app["instructions"]["mallory"].metadata.message_id)
    response = push(app, "mallory", message, tree)
    # Flower's push handler answers: this run never started, so it declines the reply itself
    # (Flower's error 2007, FLEET_RUN_STATUS_NOT_ALLOWED).
    assert "Fleet guard" not in response.text and response.json().get("code") == 2007, response.text


# --- On a real federation ------------------------------------------------------------------------

@pytest.mark.federation
@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "flower-alone"])
def test_a_registered_nodes_forged_instruction_never_reaches_another_node(guarded, tmp_path, tls, tiny_model):
    """Mallory, a registered organisation, signs with its own key through Flower's own SuperNode
    client code and pushes an instruction 'from the SuperLink' to the victim during a run. With the
    guard it is refused and the victim never pulls it; Flower alone stores and delivers it."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode.fleet_http_connection import http_request_response

    with LocalFederation(tmp_path, tls, {}, guard=guarded) as fed:
        connections = {}
        for name in ("mallory", "victim"):
            key = fed.key(name)
            ensured = fed.orgs("ensure", name, str(key.with_suffix(".pub")))
            assert ensured.returncode == 0, ensured.stdout + ensured.stderr
            private = load_ssh_private_key(key.read_bytes(), password=None)
            connections[name] = http_request_response(f"127.0.0.1:{fed.port}", False, str(tls / "ca.pem"),
                                                      (private, private.public_key()), max_retries=0)
        (mallory_id, _, mallory_send, *_), (victim_id, victim_receive, *_) = (c.__enter__() for c in connections.values())
        try:
            # A run that stays running: it waits for a third node that never comes.
            started = fed.flwr("run", ".", "local", "--format", "json", "--run-config",
                               f'base-model="{tiny_model}" min-nodes=3 node-wait-timeout=300 output-dir="{tmp_path / "out"}"')
            assert started.returncode == 0, started.stdout + started.stderr
            deadline = time.monotonic() + 120
            while fed.last_run_status() != "running":
                assert time.monotonic() < deadline, fed.log("superlink")[-3000:]
                time.sleep(1)
            run_id = int(json.loads(started.stdout)["run-id"])
            forged, tree = make_message(run_id, SUPERLINK_NODE_ID, victim_id)
            try:
                mallory_send(forged, tree, 0.0)
                refused = None
            except RunNotRunningException as exc:  # how Flower's client reads any 403
                refused = exc
            pulled = []
            for _ in range(5):  # the coordinator's own instructions (prepare) may come first
                if (got := victim_receive()) is not None:
                    pulled.append(got[0].metadata.message_id)
            delivered = forged.metadata.message_id in pulled
            if guarded:
                assert refused is not None and not delivered
                assert f"node {mallory_id} pushed a message claiming to come from node 1" in fed.log("superlink")
            else:
                assert refused is None and delivered, (refused, pulled)
            fed.flwr("stop", str(run_id), "local")
        finally:
            for c in connections.values():
                c.__exit__(None, None, None)
