"""The public port holds under abuse: docker/gateway/nginx.conf in front of the SuperLink.

Static checks pin the gateway to Flower 1.41 (its routes, the size of the largest request it
sends); the rest runs against the shared Compose stack (conftest `stack`) through the published
gateway port, as anyone on the Internet would reach it. docs/gateway.md derives each limit.
"""

from __future__ import annotations

import functools
import glob
import http.client
import math
import re
import socket
import ssl
import subprocess
import threading
import time

import pytest

from federation import REPO

NGINX_CONF = (REPO / "docker" / "gateway" / "nginx.conf").read_text()
GiB = 1 << 30


def body_cap() -> int:
    """client_max_body_size, the gateway's one size setting, in bytes."""
    (value,) = re.findall(r"^\s*client_max_body_size\s+(\d+)([km]?);", NGINX_CONF, re.M)
    return int(value[0]) * {"": 1, "k": 1 << 10, "m": 1 << 20}[value[1]]


@functools.cache
def lora_parameters(model: str, rank: int = 8) -> int:
    """The LoRA adapter's size on to_q,to_k,to_v,to_out.0 of the model's UNet (no weights needed)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    common = dict(in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8)
    configs = {  # Stable Diffusion 1.5's UNet, and segmind/tiny-sd's (../shared/notes/MODELS.md)
        "sd-1.5": dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "tiny-sd": dict(layers_per_block=1, block_out_channels=(320, 640, 1280), mid_block_type=None,
                        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    }
    with init_empty_weights():
        unet = UNet2DConditionModel(**common, **configs[model])
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return sum(math.prod(v.shape) for v in get_peft_model_state_dict(unet).values())


def masked_vector_request(parameters: int) -> bytes:
    """The push-object request that carries a node's SecAgg+ masked vector, built by Flower's own
    secaggplus_mod steps: the adapter as ONE vector (app/wire.py), quantised, masked, mod 2^32."""
    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_addition, parameters_mod
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    vector = factor_combine(1000, quantize([np.zeros(parameters, np.float32)], 8.0, 1 << 22))
    masked = parameters_mod(parameters_addition(vector, pseudo_rand_gen(bytes(32), 1 << 32, [a.shape for a in vector])),
                            1 << 32)
    record = ConfigRecord({"masked_params": [ndarray_to_bytes(a) for a in masked]})
    return PushObjectRequest(node=Node(node_id=(1 << 64) - 1), run_id=(1 << 64) - 1, object_id="f" * 64,
                             object_content=record.deflate()).SerializeToString()


# --- Static: the gateway matches Flower 1.41 -----------------------------------------------------

def test_the_gateway_serves_exactly_the_fleet_routes_a_supernode_calls():
    from flwr.superlink.routers.fleet.router import router

    (routes,) = re.findall(r"location ~ \^/v1/fleet/\(([^)]*)\)\$", NGINX_CONF)
    # Self-registration is for nodes without a registered key: this SuperLink requires one.
    flower = {r.path.removeprefix("/v1/fleet/") for r in router.routes} - {"register-node", "unregister-node"}
    assert set(routes.split("|")) == flower


def test_the_body_cap_fits_sd15s_rank8_masked_vector_and_no_more_than_needed():
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    sd15 = lora_parameters("sd-1.5")
    assert sd15 == 1_594_368 and lora_parameters("tiny-sd") == 863_232  # docs/gateway.md's figures
    largest = len(masked_vector_request(sd15))
    assert largest == 12_755_365  # int64: twice the float32 adapter (6,377,472 bytes), plus framing
    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE < largest < body_cap() < 1.5 * largest
    # The next rank that fits no longer: docs/gateway.md names rank 10 as SD 1.5's largest.
    assert len(masked_vector_request(lora_parameters("sd-1.5", 11))) > body_cap()


# --- On the Compose stack, through the published port --------------------------------------------

def tls_context(stack, **versions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(stack["root"] / "certs" / "ca.pem"))
    for attribute, version in versions.items():
        setattr(ctx, attribute, version)
    return ctx


def request(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPSConnection("localhost", stack["port"], context=tls_context(stack), timeout=60)
    conn.request(method, path, body=body, headers={"content-type": "application/protobuf", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def container_id(stack, service: str) -> str:
    return subprocess.run(["docker", "compose", "ps", "-q", service], cwd=REPO, env=stack["env"], capture_output=True,
                          text=True, check=True).stdout.strip()


class PeakMemory:
    """The container's memory, sampled every 20 ms from its cgroup on this host: the peak above
    what it held when sampling began."""

    def __init__(self, cid: str) -> None:
        paths = [p for pattern in (f"/sys/fs/cgroup/memory/docker/{cid}*/memory.usage_in_bytes",
                                   f"/sys/fs/cgroup/system.slice/docker-{cid}*.scope/memory.current",
                                   f"/sys/fs/cgroup/docker/{cid}*/memory.current") for p in glob.glob(pattern)]
        assert paths, f"no cgroup memory file for container {cid} on this host"
        self.path, self.peak, self.stop = paths[0], 0, threading.Event()

    def read(self) -> int:
        with open(self.path) as f:
            return int(f.read())

    def __enter__(self) -> PeakMemory:
        self.base = self.read()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read() - self.base)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        time.sleep(1)  # whatever the SuperLink took in, it has by now
        self.stop.set()
        self.thread.join()


def send_huge_body(stack, chunked: bool) -> tuple[int | None, int]:
    """POST 1 GiB of zeros to a Fleet route, unsigned. Returns (status, bytes the socket took)."""
    conn = http.client.HTTPSConnection("localhost", stack["port"], context=tls_context(stack), timeout=60)
    conn.putrequest("POST", "/v1/fleet/push-object")
    conn.putheader("content-type", "application/protobuf")
    conn.putheader(*(("transfer-encoding", "chunked") if chunked else ("content-length", str(GiB))))
    conn.endheaders()
    block, sent = bytes(1 << 20), 0
    try:
        while sent < GiB:
            conn.send(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except OSError:  # the gateway refused and closed: what matters is what reached the SuperLink
        pass
    try:
        return conn.getresponse().status, sent
    except (OSError, http.client.HTTPException):
        return None, sent


@pytest.mark.docker
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_1gib_body_without_a_node_key_never_reaches_the_superlink(stack, chunked):
    with PeakMemory(container_id(stack, "superlink")) as memory:
        status, sent = send_huge_body(stack, chunked)
    assert status in (413, None), status  # None: closed before the answer could be read
    assert memory.peak < body_cap(), f"the SuperLink grew by {memory.peak:,} bytes (cap {body_cap():,})"
    logs = subprocess.run(["docker", "logs", "--since", "60s", container_id(stack, "gateway")], capture_output=True,
                          text=True).stdout
    assert '"POST /v1/fleet/push-object HTTP/1.1" 413' in logs, logs[-2000:]


@pytest.mark.docker
def test_the_largest_legitimate_request_reaches_the_superlink(stack):
    body = masked_vector_request(lora_parameters("sd-1.5"))
    status, answer = request(stack, "POST", "/v1/fleet/push-object", body)
    # Flower's own answer to an unsigned request, not nginx's 413.
    assert status == 401 and b"Invalid SuperNode authentication" in answer, (status, answer[:300])


REFUSED_PATHS = [
    "//v1/control/list-runs", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E/control/list-runs", "/v1/fleet/..%2fcontrol/list-runs", "/v1/fleet%2f..%2fcontrol/list-runs",
    "/v1/fleet/pull-messages/../../control/list-runs", "/v1/fleet/pull-messages;/../../control/list-runs",
    "/V1/CONTROL/LIST-RUNS", "/v1/Control/list-runs", "/V1/FLEET/PULL-MESSAGES", "/v1/control/list-runs;",
    "/v1/control;/list-runs", "/v1/fleet/pull-messages;", "/v1/fleet/pull-messages/", "/v1/runtime/get-nodes",
    "/v1/fleet/register-node", "/v1/fleet/", "/docs", "/openapi.json",
]


@pytest.mark.docker
def test_control_runtime_and_their_disguises_stay_refused(stack):
    for path in REFUSED_PATHS:
        status, body = request(stack, "POST", path, b"")
        assert status in (400, 403) and b"application/protobuf" not in body, (path, status, body[:200])
    # The way in still works: Flower answers an unsigned Fleet call itself.
    assert request(stack, "POST", "/v1/fleet/pull-messages", b"")[0] == 401


@pytest.mark.docker
def test_methods_other_than_flowers_are_refused(stack):
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"):
        status, _ = request(stack, method, "/v1/fleet/pull-messages")
        assert status in (400, 403, 405), (method, status)
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert request(stack, method, "/health", b"")[0] in (403, 405), method
    assert request(stack, "GET", "/health")[0] == 200


@pytest.mark.docker
def test_tls_13_only_with_mozillas_suites(stack):
    with pytest.raises(ssl.SSLError):
        request_tls(stack, maximum_version=ssl.TLSVersion.TLSv1_2)
    version, cipher = request_tls(stack, minimum_version=ssl.TLSVersion.TLSv1_3)
    assert version == "TLSv1.3" and cipher in {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                               "TLS_CHACHA20_POLY1305_SHA256"}, cipher
    # Mozilla's profiles leave out TLS 1.3's CCM suites; OpenSSL's client can offer one alone.
    ccm = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{stack['port']}", "-tls1_3",
                          "-ciphersuites", "TLS_AES_128_CCM_SHA256"], input="", capture_output=True, text=True,
                         timeout=30)
    assert ccm.returncode != 0 and "TLS_AES_128_CCM_SHA256" not in ccm.stdout.split("---")[-1], ccm.stdout[-500:]


def request_tls(stack, **versions) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", stack["port"]), timeout=10) as raw:
        with tls_context(stack, **versions).wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version(), tls.cipher()[0]


@pytest.mark.docker
def test_stalled_bodies_hold_few_connections_and_not_for_long(stack):
    """One client's stalled uploads: past 16 at once it is refused (503, which Flower's client
    retries), and each stalled one is dropped after the 10 s body timeout."""
    stalled = []
    try:
        for _ in range(16):
            conn = http.client.HTTPSConnection("localhost", stack["port"], context=tls_context(stack), timeout=30)
            conn.putrequest("POST", "/v1/fleet/push-object")
            conn.putheader("content-length", "1000")
            conn.endheaders()
            conn.send(b"x")  # and then nothing
            stalled.append(conn)
        time.sleep(0.5)
        assert request(stack, "POST", "/v1/fleet/pull-messages", b"")[0] == 503
        started = time.monotonic()
        try:  # nginx gives up waiting for the body: 408, or just the connection closed
            assert stalled[0].getresponse().status == 408
        except (ConnectionError, http.client.RemoteDisconnected):
            pass
        assert time.monotonic() - started < 15
    finally:
        for conn in stalled:
            conn.close()
    time.sleep(1)
    assert request(stack, "POST", "/v1/fleet/pull-messages", b"")[0] == 401


@pytest.mark.docker
def test_a_burst_beyond_the_rate_limit_is_slowed_then_served_again(stack):
    # GET on a Fleet route: counted by the rate limit, then refused by nginx itself (403), so the
    # burst goes as fast as the gateway answers, whatever the SuperLink's speed.
    conn = http.client.HTTPSConnection("localhost", stack["port"], context=tls_context(stack), timeout=30)
    statuses = []
    for _ in range(400):  # burst 200 at 20/s: the last ones must be refused with 503
        conn.request("GET", "/v1/fleet/pull-messages")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    assert statuses[:150] == [403] * 150 and statuses.count(503) >= 20, statuses
    time.sleep(10)  # the bucket drains at 20/s: leave it empty for the other tests on this stack
    assert request(stack, "GET", "/health")[0] == 200
