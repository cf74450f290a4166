"""Checkpoints and resume: only complete rounds count, and only for the same setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.outputs import ADAPTER_FILE, OutputDir

IDENTITY = {"base-model": "m", "lora-rank": 4, "lora-alpha": 4, "lora-target-modules": "to_q"}
STATE = {"down.lora_A.weight": np.ones((4, 8), np.float32), "down.lora_B.weight": np.zeros((8, 4), np.float32)}


def _round(out: OutputDir, rnd: int, scale: float = 1.0) -> None:
    out.write_round(rnd, {"round": rnd, "heldout_loss": 1.0 / (rnd + 1)},
                    {k: v * scale for k, v in STATE.items()}, samples=None)


def test_resume_from_last_complete_round(tmp_path):
    out = OutputDir(tmp_path)
    out.claim(IDENTITY)
    assert out.last_checkpoint() is None
    for rnd in range(3):
        _round(out, rnd, scale=rnd + 1)
    # A round interrupted mid-write is never taken for a complete one.
    (tmp_path / "rounds" / "round-0003.partial").mkdir()
    (tmp_path / "rounds" / "round-0003.partial" / ADAPTER_FILE).write_bytes(b"half")
    rnd, state = out.last_checkpoint()
    assert rnd == 2
    assert np.array_equal(state["down.lora_A.weight"], STATE["down.lora_A.weight"] * 3)
    assert [m["round"] for m in out.history()] == [0, 1, 2]
    from PIL import Image
    assert Image.open(tmp_path / "losses.png").size == (720, 420)


def test_rewriting_a_round_replaces_it_and_history(tmp_path):
    out = OutputDir(tmp_path)
    out.claim(IDENTITY)
    _round(out, 1)
    out.write_round(1, {"round": 1, "heldout_loss": 0.5}, STATE, samples=None)
    assert out.history() == [{"round": 1, "heldout_loss": 0.5}]
    assert json.loads((out.round_dir(1) / "metrics.json").read_text())["heldout_loss"] == 0.5


def test_output_dir_of_another_setup_is_refused(tmp_path):
    OutputDir(tmp_path).claim(IDENTITY)
    with pytest.raises(ValueError, match="lora-rank.*new output-dir"):
        OutputDir(tmp_path).claim(IDENTITY | {"lora-rank": 16})
    OutputDir(tmp_path).claim(dict(IDENTITY))  # the same setup resumes


def test_final_is_a_copy_of_the_last_round(tmp_path):
    out = OutputDir(tmp_path)
    out.claim(IDENTITY)
    _round(out, 1)
    final = out.write_final(1)
    assert final.read_bytes() == (out.round_dir(1) / ADAPTER_FILE).read_bytes()


def test_metrics_learnt_later_are_added_to_the_round(tmp_path):
    out = OutputDir(tmp_path)
    out.claim(IDENTITY)
    out.write_round(1, {"round": 1, "heldout_loss": None}, STATE, samples=None)
    out.update_round_metrics(1, {"heldout_loss": 0.25})
    assert out.round_metrics(1)["heldout_loss"] == 0.25
    assert out.history() == [{"round": 1, "heldout_loss": 0.25}]


@pytest.mark.parametrize("key,value", [("seed", 1), ("heldout-fraction", 0.2), ("lora-rank", 16)])
def test_resume_with_settings_that_change_what_is_measured_is_refused(tmp_path, key, value):
    from app.config import RunConfig
    from conftest import with_defaults

    def identity(**overrides) -> dict:
        return RunConfig.from_flower(with_defaults({"output-dir": str(tmp_path)} | overrides)).model_identity

    OutputDir(tmp_path).claim(identity())
    # The seed picks the held-out images and the evaluation noise: another one makes the held-out
    # losses of earlier rounds incomparable with later ones.
    with pytest.raises(ValueError, match=f"'{key}'.*new output-dir"):
        OutputDir(tmp_path).claim(identity(**{key: value}))
    OutputDir(tmp_path).claim(identity(**{"num-server-rounds": 50, "local-steps": 7}))  # more rounds: resumes


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tmp_path):
    import os
    import socket

    first = OutputDir(tmp_path)
    first.claim(IDENTITY)
    with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()} "
                                           r"since .*\).*another output-dir"):
        OutputDir(tmp_path).claim(IDENTITY)
    first.release()  # the run ended
    OutputDir(tmp_path).claim(IDENTITY)


def test_the_lock_holds_across_processes_and_ends_with_the_process(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from app.outputs import OutputDir; "
         f"out = OutputDir(__import__('pathlib').Path({str(tmp_path)!r})); out.claim({IDENTITY!r}); "
         "print('claimed', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline() == "claimed\n"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid} "):
            OutputDir(tmp_path).claim(IDENTITY)
    finally:
        holder.communicate("")  # ends the first run
    OutputDir(tmp_path).claim(IDENTITY)  # no stale lock after the process is gone


# --- held-out figures say which organisations they cover --------------------------------------

ALL, TWO = ["org-1", "org-2", "org-3"], ["org-1", "org-2"]
# org-3 missed round 3, so round 2's adapter was measured on org-1 and org-2 only.
CHANGING = [{"round": 0, "heldout_loss": 1.0, "heldout_orgs": ALL, "train_loss": None},
            {"round": 1, "heldout_loss": 0.9, "heldout_orgs": ALL, "train_loss": 0.95},
            {"round": 2, "heldout_loss": 0.4, "heldout_orgs": TWO, "train_loss": 0.85},
            {"round": 3, "heldout_loss": 0.8, "heldout_orgs": ALL, "train_loss": 0.8}]


def test_heldout_summary_compares_like_with_like():
    from app.outputs import heldout_summary

    assert heldout_summary(CHANGING) == ("0: 1.00000, 1: 0.90000, 3: 0.80000 (org-1, org-2, org-3); not comparable, "
                                         "other organisations: 2: 0.40000 (org-1, org-2)")
    same = [m | {"heldout_orgs": ALL} for m in CHANGING]
    assert heldout_summary(same) == "0: 1.00000, 1: 0.90000, 2: 0.40000, 3: 0.80000 (org-1, org-2, org-3)"


def test_loss_plot_sets_apart_heldout_points_of_other_organisations():
    from app.outputs import HELDOUT_OTHER_COLOR, loss_plot

    def has_other_color(history) -> bool:
        return HELDOUT_OTHER_COLOR in {c for _, c in loss_plot(history).getcolors(1 << 20)}

    assert has_other_color(CHANGING)
    assert not has_other_color([m | {"heldout_orgs": ALL} for m in CHANGING])

