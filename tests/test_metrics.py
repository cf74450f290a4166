"""Metrics must never stop training: an unwritable metrics directory leaves them in the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USE_METRICS = """
from prometheus_client import REGISTRY
import app.client_app  # every stage imports this first
from app import metrics
metrics.TRAIN_LOSS.labels("org-1").set(0.25)
print(REGISTRY.get_sample_value("fedlora_train_loss", {"org": "org-1"}))
"""


def _import_with_metrics_dir(directory: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", prelude + USE_METRICS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_unwritable_metrics_directory_falls_back_to_in_process_metrics(tmp_path):
    # A file where the directory should be: not writable even by root (the tests may run as root,
    # for whom chmod 0500 changes nothing), like a read-only or broken volume.
    (tmp_path / "volume").write_text("")
    result = _import_with_metrics_dir(tmp_path / "volume" / "metrics")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0.25"
    assert result.stderr.count("metrics stay in this process") == 1, result.stderr


def test_full_metrics_volume_falls_back_to_in_process_metrics(tmp_path):
    # A write through a metric file's mmap on a full volume would kill the process (SIGBUS).
    full = "import os, types; os.statvfs = lambda path: types.SimpleNamespace(f_bavail=1, f_frsize=4096)\n"
    result = _import_with_metrics_dir(tmp_path, prelude=full)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0.25"
    assert "less than 16 MiB free" in result.stderr and not any(p.name.endswith(".db") for p in tmp_path.iterdir())


def test_writable_metrics_directory_is_shared_between_processes(tmp_path):
    first = _import_with_metrics_dir(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert any(p.name.startswith("gauge_") for p in tmp_path.iterdir())  # for the exporter to serve


def test_a_non_finite_loss_is_exported_before_the_node_fails(tiny_model, demo_data, tmp_path):
    # FedloraNonFiniteLoss fires on the loss gauges: they must hold the bad value when the node stops.
    import math

    import numpy as np
    import pytest
    from prometheus_client import REGISTRY

    from app import model
    from app.training import local_update
    from app.config import NodeConfig, RunConfig
    from conftest import tiny_run_config, with_defaults

    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    node = NodeConfig(demo_data / "org-1", "org-diverged", None, tmp_path / "cache")
    # A global adapter that diverged: every prediction, hence every loss, is NaN.
    diverged = [np.full_like(a, np.inf) for a in model.lora_state(model.LoraUNet.load(cfg).unet).values()]
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        local_update(cfg, node, diverged, rnd=1)
    for gauge in ("fedlora_train_loss", "fedlora_heldout_loss"):
        assert math.isnan(REGISTRY.get_sample_value(gauge, {"org": "org-diverged"})), gauge
