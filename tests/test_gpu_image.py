"""The CUDA image, built the way `make up-gpu` builds it, checked on a machine without a GPU.

It must hold the CUDA build of the pinned torch (not the CPU wheel that CI's base offers under the
same version), and the app must still train in it on CPU: the same code path a GPU node takes,
minus the device. Its size is printed and bounded, so that growth is noticed.
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
    env = offline_env(COMPOSE_PROJECT_NAME="fedlora-gpu-image", IMAGE_TAG="gpu-image-test", COMPOSE_PROFILES="demo")
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


# One local training step with the app's own code (in a node, a run's bundle brings it), on CPU.
TRAIN_STEP = """
import json, sys
import numpy as np
from app import model
from app.config import NodeConfig, RunConfig

cfg = RunConfig.from_flower(json.loads(sys.argv[1]))
node = NodeConfig.from_flower({"data-dir": sys.argv[2], "org": "org-1", "cache-dir": sys.argv[3]})
data = model.prepare_data(cfg, node)
unet = model.LoraUNet.load(cfg)
before = {k: a.copy() for k, a in model.lora_state(unet.unet).items()}  # the arrays share the weights
stats = unet.train(data, steps=1, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)
moved = max(float(np.abs(a - before[k]).max()) for k, a in model.lora_state(unet.unet).items())
print(json.dumps({"device": str(unet.device), "loss": stats["train_loss"], "moved": moved}))
"""


def test_the_app_trains_a_step_on_cpu_in_the_cuda_image(cuda_image, tmp_path):
    # Bind-mounted folders must be readable by the container's unprivileged user.
    tmp_path.chmod(0o755)
    write_tiny_model(tmp_path / "tiny-sd")
    write_demo_data(tmp_path / "data", orgs=1, images_per_org=8)
    cfg = with_defaults(tiny_run_config(Path("/models/tiny-sd"), Path("/unused")))
    out = run_in(cuda_image, "-c", TRAIN_STEP, json.dumps(cfg), "/data", "/tmp/cache", volumes={
        REPO / "app": "/src/app", tmp_path / "tiny-sd": "/models/tiny-sd", tmp_path / "data" / "org-1": "/data"})
    step = json.loads(out.strip().splitlines()[-1])
    print(f"one step in the CUDA image on {step['device']}: loss {step['loss']:.6f}, "
          f"largest LoRA change {step['moved']:.3e}")
    assert step["device"] == "cpu" and step["moved"] > 0
    # The same step here, with the CPU build of torch (what the CPU image runs): the same numbers.
    cfg["base-model"] = str(tmp_path / "tiny-sd")
    here = subprocess.run([sys.executable, "-c", TRAIN_STEP, json.dumps(cfg), str(tmp_path / "data" / "org-1"),
                           str(tmp_path / "cache")], cwd=REPO, env=offline_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert here.returncode == 0, here.stderr[-4000:]
    cpu = json.loads(here.stdout.strip().splitlines()[-1])
    print(f"the same step with the CPU build here: loss {cpu['loss']:.6f}, largest LoRA change {cpu['moved']:.3e}")
    assert step["loss"] == pytest.approx(cpu["loss"], rel=1e-4), (step, cpu)
    assert step["moved"] == pytest.approx(cpu["moved"], rel=1e-3), (step, cpu)
