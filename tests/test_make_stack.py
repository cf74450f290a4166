"""The stack's make targets where a mistake costs: `make gpu-check` (docker/gpu_check.sh), which `make up-gpu`
and `make join-gpu` run before building a 5.8 GB image; down/ps/logs after a GPU stack; `make clean`. No GPU here: `docker` and `nvidia-smi` are stand-ins on PATH that answer as a host would
(Docker's runtimes as `docker info` prints them, the driver version as nvidia-smi's CSV query prints
it), and record every call, so the tests also see that nothing was built after a failed check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WITH_NVIDIA = '{"io.containerd.runc.v2":{"path":"runc"},"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'
WITHOUT_NVIDIA = '{"io.containerd.runc.v2":{"path":"runc"},"runc":{"path":"runc"}}'


def host(tmp_path: Path, runtimes: str, driver: str | None) -> dict:
    """PATH with a `docker` that knows `runtimes` and, unless driver is None, an `nvidia-smi` of that driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "docker").write_text(
        f"#!/bin/sh\necho \"docker $*\" >> {calls}\n"
        f"if [ \"$1\" = info ]; then echo '{runtimes}'; fi\n")
    if driver is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho \"nvidia-smi $*\" >> {calls}\nprintf '{driver}\\n{driver}\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls)}


def gpu_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "docker/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_ready_host_passes(tmp_path):
    result = gpu_check(host(tmp_path, WITH_NVIDIA, "580.65.06"))
    assert result.returncode == 0, result.stderr
    assert "ok     runtime" in result.stdout and "NVIDIA driver 580.65.06, 2 GPU(s)" in result.stdout


@pytest.mark.parametrize(("runtimes", "driver", "says"), [
    (WITHOUT_NVIDIA, "580.65.06", "nvidia-ctk runtime configure --runtime=docker"),
    (WITH_NVIDIA, "570.124.06", "NVIDIA driver 570.124.06 is older than 580"),
    (WITH_NVIDIA, None, "no nvidia-smi on this host: install NVIDIA's driver, 580 series or newer"),
], ids=["no-nvidia-runtime", "driver-570", "no-driver"])
def test_a_host_that_cannot_run_the_cuda_image_is_told_what_to_install(tmp_path, runtimes, driver, says):
    result = gpu_check(host(tmp_path, runtimes, driver))
    assert result.returncode == 1 and says in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["up-gpu", "join-check-gpu", "join-gpu"])
def test_gpu_targets_check_the_host_before_they_build(tmp_path, target):
    env = host(tmp_path, WITH_NVIDIA, "550.54.15")
    result = subprocess.run(["make", target, "ORG=clinic-a", f"STACK_STATE={tmp_path / 'stack-gpu'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "older than 580" in result.stderr, result.stdout + result.stderr
    calls = Path(env["CALLS"]).read_text()
    assert "build" not in calls and "compose" not in calls, calls


# --- the stack's other targets: which overlay, and what clean deletes ----------------------------

def test_down_ps_and_logs_cover_the_overlay_that_started_the_stack(tmp_path):
    """After `make up-gpu` (which leaves STACK_STATE behind) they include compose.gpu.yaml and with it the
    DCGM exporter; after `make up` they do not."""
    state = tmp_path / "stack-gpu"
    for target in ("down", "ps", "logs"):
        cpu = subprocess.run(["make", "-n", target, f"STACK_STATE={state}"], cwd=REPO, capture_output=True, text=True)
        assert "docker compose" in cpu.stdout and "compose.gpu.yaml" not in cpu.stdout, cpu.stdout
        state.touch()
        gpu = subprocess.run(["make", "-n", target, f"STACK_STATE={state}"], cwd=REPO, capture_output=True, text=True)
        assert "-f compose.yaml -f compose.gpu.yaml" in gpu.stdout, gpu.stdout
        state.unlink()
    up_gpu = subprocess.run(["make", "-n", "up-gpu", f"STACK_STATE={state}"], cwd=REPO, capture_output=True, text=True)
    assert f"touch {state}" in up_gpu.stdout


def test_clean_says_what_it_deletes_and_deletes_nothing_unconfirmed(tmp_path):
    env = host(tmp_path, WITHOUT_NVIDIA, None)
    outputs = tmp_path / "outputs"
    (outputs / "run").mkdir(parents=True)
    result = subprocess.run(["make", "clean", f"OUTPUTS_DIR={outputs}"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "make clean CONFIRM=1" in result.stderr, result.stderr
    assert "Deletes: the stack's volumes" in result.stdout and str(outputs) in result.stdout
    assert (outputs / "run").is_dir() and not Path(env["CALLS"]).exists()
    confirmed = subprocess.run(["make", "-n", "clean", "CONFIRM=1", f"OUTPUTS_DIR={outputs}"], cwd=REPO,
                               capture_output=True, text=True)
    assert "down --volumes" in confirmed.stdout and f'rm -rf "{outputs}"' in confirmed.stdout


def test_make_up_says_when_alerts_reach_nobody():
    def up(**env):
        return subprocess.run(["make", "-n", "up"], cwd=REPO, capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if not k.startswith("ALERT_")} | env).stdout
    assert "Alerts: no receiver configured" in up()  # the shipped .env
    assert "Alerts: no receiver configured" not in up(ALERT_WEBHOOK_URL="http://127.0.0.1:9/hook")
    assert "Alerts: no receiver configured" not in up(ALERT_EMAIL_TO="ops@example.org")
