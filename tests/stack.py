"""The Compose stack on a real Docker engine, as a user brings it up, for the tests that need one.

    with compose_stack("fedlora-e2e") as stack:   # make certs up, in a temporary root
        flwr(stack, "ls", "remote-federation")

Each caller names its own Compose project, so stacks never share containers or volumes, and
gets its own free ports. Images build from $BASE_IMAGE (CI: the local Debian stand-ins, see .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.offline import write_demo_data, write_tiny_model
from conftest import ORGS
from federation import BIN, PORT_TRIES, REPO, free_port, offline_env


# Docker's words when a published port is taken.
PORT_TAKEN = re.compile(r"port is already allocated|address already in use")
# How a container on another Docker network (a joining organisation) names this host.
JOIN_HOST = "host.docker.internal"


def docker_ready() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@contextmanager
def compose_stack(project: str, images_per_org: int | list[int] = 16, **env_overrides: str) -> Iterator[dict]:
    """`make certs up` for the Compose project `project` with the tiny model and three demo
    organisations; on exit, print the last logs and remove everything it made (volumes included)."""
    if not docker_ready():
        if os.environ.get("CI"):
            pytest.fail("no Docker engine in CI: .ci/run provisions one with ../shared/ci/docker-engine.sh")
        pytest.skip("no Docker engine here (../shared/ci/docker-engine.sh provisions one)")
    # Bind-mounted folders must be readable by the containers' unprivileged user.
    root = Path(tempfile.mkdtemp(prefix=f"{project}-"))
    root.chmod(0o755)
    write_tiny_model(root / "models" / "tiny-sd")
    write_demo_data(root / "data", orgs=len(ORGS), images_per_org=images_per_org)
    env = offline_env(
        COMPOSE_PROJECT_NAME=project, SUPERLINK_PORT=str(free_port()), CONTROL_PORT=str(free_port()),
        PROMETHEUS_PORT=str(free_port()), COMPOSE_PROFILES="demo",  # Grafana cannot run here; its queries are checked
        DATA_DIR=str(root / "data"), MODELS_DIR=str(root / "models"), OUTPUTS_DIR=str(root / "outputs"),
        CERTS_DIR=str(root / "certs"), FLWR_HOME=str(root / "flwr-home"), DEMO_APPROVAL_DIR=str(root / "demo-approval"),
        JOIN_APPROVAL_DIR=str(root / "join-approval"), **env_overrides,
    )
    for d in ("certs", "outputs"):
        (root / d).mkdir()
    os.chmod(root / "outputs", 0o755)
    try:
        result = subprocess.run(["make", "certs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"make certs:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        for _ in range(PORT_TRIES):
            result = subprocess.run(["make", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
            if result.returncode == 0 or not PORT_TAKEN.search(result.stdout + result.stderr):
                break
            # free_port() only guesses: someone took a port between it and Docker's bind. Start
            # again on other ports (the certificates stay; the state is new).
            subprocess.run(["docker", "compose", "down", "--volumes", "--remove-orphans"], cwd=REPO, env=env,
                           capture_output=True, timeout=300)
            env.update({k: str(free_port()) for k in ("SUPERLINK_PORT", "CONTROL_PORT", "PROMETHEUS_PORT")})
        assert result.returncode == 0, f"make up:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        yield {"root": root, "env": env, "port": int(env["SUPERLINK_PORT"]), "control": int(env["CONTROL_PORT"]),
               "prometheus": f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"}
    finally:
        logs = subprocess.run(["docker", "compose", "logs", "--no-color", "--tail=60"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        print(logs.stdout[-20000:])
        subprocess.run(["docker", "compose", "down", "--volumes", "--remove-orphans"], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
        subprocess.run(["docker", "run", "--rm", "-v", f"{root}:/r", "--entrypoint", "rm", superlink_image(),
                        "-rf", "/r/outputs"], capture_output=True)  # written by the container's user
        shutil.rmtree(root, ignore_errors=True)


def superlink_image() -> str:
    """The stack's superlink image, named as compose.yaml names it (IMAGE_PREFIX/IMAGE_TAG: the shell's, else .env's)."""
    shipped = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines() if "=" in line and line[0] != "#")
    return f"{os.environ.get('IMAGE_PREFIX') or shipped['IMAGE_PREFIX']}/superlink:{os.environ.get('IMAGE_TAG') or shipped['IMAGE_TAG']}"


def compose(stack, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "compose", *args], cwd=REPO, env=stack["env"], capture_output=True, text=True,
                          timeout=300, **kwargs)


def flwr(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=stack["env"], capture_output=True, text=True,
                          timeout=timeout)


def run_status(stack, run_id: str | None = None) -> subprocess.CompletedProcess:
    """docker/run_status.py: how a run ended (exit 0 only for "finished:completed")."""
    return subprocess.run(["python3", "docker/run_status.py", str(BIN / "flwr"), "remote-federation",
                           *([run_id] if run_id else [])], cwd=REPO, env=stack["env"], capture_output=True, text=True)
