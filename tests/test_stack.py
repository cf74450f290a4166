"""The Compose stack end to end on a real Docker engine, as a user runs it.

`make certs build up`, then the literal `flwr run . remote-federation` over TLS with SecAgg+ on
the tiny model and three organisations; then what the user gets is checked and the stack torn
down. Images build from $BASE_IMAGE (CI: the local Debian stand-in, see .ci/run).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from app.offline import write_demo_data, write_tiny_model
from conftest import ORGS
from federation import BIN, REPO, free_port, kv, offline_env

pytestmark = pytest.mark.docker


def _docker_ready() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def stack():
    if not _docker_ready():
        if os.environ.get("CI"):
            pytest.fail("no Docker engine in CI: .ci/run provisions one with ../shared/ci/docker-engine.sh")
        pytest.skip("no Docker engine here (../shared/ci/docker-engine.sh provisions one)")
    # Bind-mounted folders must be readable by the containers' unprivileged user.
    root = Path(tempfile.mkdtemp(prefix="fedlora-stack-"))
    root.chmod(0o755)
    write_tiny_model(root / "models" / "tiny-sd")
    write_demo_data(root / "data", orgs=len(ORGS), images_per_org=16)
    env = offline_env(
        COMPOSE_PROJECT_NAME="fedlora-e2e", SUPERLINK_PORT=str(free_port()), SUPERLINK_BIND="127.0.0.1",
        DATA_DIR=str(root / "data"), MODELS_DIR=str(root / "models"), OUTPUTS_DIR=str(root / "outputs"),
        CERTS_DIR=str(root / "certs"), FLWR_HOME=str(root / "flwr-home"),
    )
    for d in ("certs", "outputs"):
        (root / d).mkdir()
    os.chmod(root / "outputs", 0o755)
    try:
        for target in ("certs", "up"):
            result = subprocess.run(["make", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, f"make {target}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        yield {"root": root, "env": env, "port": int(env["SUPERLINK_PORT"])}
    finally:
        logs = subprocess.run(["docker", "compose", "logs", "--no-color", "--tail=60"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        print(logs.stdout[-20000:])
        subprocess.run(["docker", "compose", "down", "--volumes", "--remove-orphans"], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
        subprocess.run(["docker", "run", "--rm", "-v", f"{root}:/r", "--entrypoint", "rm", "fedlora/superlink:0.1.0",
                        "-rf", "/r/outputs"], capture_output=True)  # written by the container's user
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def run(stack):
    config = {"base-model": "/models/tiny-sd", "resolution": 32, "num-server-rounds": 2, "local-steps": 8,
              "learning-rate": 1e-3, "heldout-fraction": 0.25, "sample-steps": 2, "output-dir": "/outputs/e2e"}
    # The literal command a user types, from the repository root, with the connection `make up` wrote.
    result = subprocess.run([str(BIN / "flwr"), "run", ".", "remote-federation", "--stream", "--run-config", kv(config)],
                            cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=1200)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    # `flwr run --stream` exits 0 even when the ServerApp failed: ask how the run ended.
    status = subprocess.run(["python3", "docker/run_status.py", str(BIN / "flwr"), "remote-federation"], cwd=REPO,
                            env=stack["env"], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    return stack["root"] / "outputs" / "e2e"


def test_every_service_is_healthy(stack):
    ps = subprocess.run(["docker", "compose", "ps", "--format", "json"], cwd=REPO, env=stack["env"],
                        capture_output=True, text=True, check=True).stdout
    services = [json.loads(line) for line in ps.splitlines() if line.strip()]
    assert {s["Service"]: s["Health"] for s in services} == {n: "healthy" for n in ("superlink", "serverapp", *ORGS)}


def test_run_completed_every_round_with_all_organisations(run):
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["aggregation"] == "secagg+" and r["aggregated"] == list(ORGS)
    assert all(r["heldout_loss"] is not None for r in rounds)


def test_outputs_hold_a_final_adapter_that_loads_in_diffusers(run, tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    prompt = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, output_type="np")
    base = pipe(**prompt, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.load_lora_weights(run / "final")
    assert np.abs(pipe(**prompt, generator=torch.Generator().manual_seed(0)).images[0] - base).max() > 1e-3


def test_superlink_speaks_only_tls(stack):
    ca = ssl.create_default_context(cafile=str(stack["root"] / "certs" / "ca.pem"))
    conn = http.client.HTTPSConnection("localhost", stack["port"], context=ca, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200  # the same request over TLS is served
    plain = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/health")
        response = plain.getresponse()
        pytest.fail(f"plaintext request answered with HTTP {response.status}")
    insecure = Path(stack["env"]["FLWR_HOME"]) / "insecure"
    insecure.mkdir(exist_ok=True)
    (insecure / "config.toml").write_text(f'[superlink.plain]\naddress = "127.0.0.1:{stack["port"]}"\ninsecure = true\n')
    result = subprocess.run([str(BIN / "flwr"), "ls", "plain"], cwd=REPO, env=stack["env"] | {"FLWR_HOME": str(insecure)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
