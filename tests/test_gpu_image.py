"""The CUDA image, built the way `make up-gpu` builds it, checked on a machine without a GPU.

It must hold the CUDA build of the pinned torch (not the CPU wheel that CI's base offers under the
same version), and the app must still train in it on CPU as the CPU build does (several steps
against the CPU build's trajectory, tests/trajectory.py): the same code path a GPU node takes, minus
the device. Its size is printed and bounded, so that growth is noticed.
Images build from $BASE_IMAGE (CI: the local Debian stand-in, see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from app.offline import write_demo_data, write_tiny_model
from conftest import tiny_run_config, with_defaults
from federation import REPO, offline_env
from trajectory import disagreements

pytestmark = pytest.mark.docker
COMPOSE_GPU = ["docker", "compose", "-f", "compose.yaml", "-f", "compose.gpu.yaml"]
# Measured 5.81 GB (torch 2.13.0 and its CUDA 13.0 libraries take 4.8 GB of it); the bound notices growth.
MAX_IMAGE_BYTES = 8 * 10**9


def pinned_torch() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("torch=="))


@pytest.fixture(scope="module")
def cuda_image() -> str:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("no Docker engine in CI: .ci/run provisions one with ../shared/ci/docker-engine.sh")
        pytest.skip("no Docker engine here (../shared/ci/docker-engine.sh provisions one)")
    # A tag of its own: the stack tests and a user's `make up-gpu` keep theirs.
    tag = f"{os.environ['IMAGE_TAG']}-gpu-image-test" if os.environ.get("IMAGE_TAG") else "gpu-image-test"
    env = offline_env(COMPOSE_PROJECT_NAME="fedlora-gpu-image", IMAGE_TAG=tag, COMPOSE_PROFILES="demo")
    config = subprocess.run([*COMPOSE_GPU, "config", "--format", "json"], cwd=REPO, env=env,
                            capture_output=True, text=True, check=True)
    image = json.loads(config.stdout)["services"]["serverapp"]["image"]
    start = time.monotonic()
    result = subprocess.run([*COMPOSE_GPU, "build", "serverapp"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"built {image} in {time.monotonic() - start:.0f} s")
    return image


def run_in(image: str, *args: str, volumes: dict[Path, str] | None = None) -> str:
    """Like a node: unprivileged, read-only root, no network; no --gpus, so no GPU either."""
    mounts = [a for host, target in (volumes or {}).items() for a in ("-v", f"{host}:{target}:ro")]
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",
         "-w", "/src", "-e", "OMP_NUM_THREADS=1", "-e", "HF_HUB_OFFLINE=1", "-e", "HF_HOME=/tmp/hf", *mounts,
         "--entrypoint", "python", image, *args],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_cuda_image_holds_the_cuda_build_of_the_pinned_torch(cuda_image):
    report = json.loads(run_in(cuda_image, "-c", (
        "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
        "'cudnn': torch.backends.cudnn.version(), 'available': torch.cuda.is_available()}))")))
    print(f"torch {report['version']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}")
    assert report["version"].split("+")[0] == pinned_torch() and not report["version"].endswith("+cpu")
    assert report["cuda"] and report["cudnn"]  # the CUDA libraries are in the image and load
    assert report["available"] is False  # no GPU given to the container: the app must fall back to CPU


def test_cuda_image_size_is_bounded(cuda_image):
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", cuda_image],
                              capture_output=True, text=True, check=True).stdout)
    print(f"{cuda_image}: {size / 1e9:.2f} GB")
    assert size < MAX_IMAGE_BYTES


def test_the_app_trains_in_the_cuda_image_as_in_the_cpu_build(cuda_image, tmp_path):
    """Several steps of the app's training on CPU in the CUDA image (the code path a GPU node takes,
    minus the device) follow the CPU build's trajectory within tests/trajectory.py's stated tolerance."""
    # Bind-mounted folders must be readable by the container's unprivileged user.
    tmp_path.chmod(0o755)
    write_tiny_model(tmp_path / "tiny-sd")
    write_demo_data(tmp_path / "data", orgs=1, images_per_org=8)
    cfg = with_defaults(tiny_run_config(Path("/models/tiny-sd"), Path("/unused")))
    out = run_in(cuda_image, "/src/trajectory.py", json.dumps(cfg), "/data", "/tmp/cache", volumes={
        REPO / "app": "/src/app", REPO / "tests" / "trajectory.py": "/src/trajectory.py",
        tmp_path / "tiny-sd": "/models/tiny-sd", tmp_path / "data" / "org-1": "/data"})
    image = json.loads(out.strip().splitlines()[-1])
    # The same trajectory here, with the CPU build of torch (what the CPU image runs).
    cfg["base-model"] = str(tmp_path / "tiny-sd")
    here = subprocess.run([sys.executable, str(REPO / "tests" / "trajectory.py"), json.dumps(cfg),
                           str(tmp_path / "data" / "org-1"), str(tmp_path / "cache")], cwd=REPO,
                          env=offline_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert here.returncode == 0, here.stderr[-4000:]
    cpu = json.loads(here.stdout.strip().splitlines()[-1])
    print(f"CUDA image on {image['device']}: losses {image['losses']}\nCPU build: losses {cpu['losses']}")
    assert image["device"] == "cpu"
    assert not disagreements(image, cpu), disagreements(image, cpu)
