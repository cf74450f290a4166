"""The check tests/test_gpu_image.py applies to the CUDA image, here in process on the CPU build: a
trajectory agrees with itself and disagrees with each deliberately broken update, so the image test
can fail when the image trains wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_run_config, with_defaults
from trajectory import disagreements, trajectory


@pytest.fixture(scope="module")
def setup(tiny_model, demo_data, tmp_path_factory):
    cfg = with_defaults(tiny_run_config(tiny_model, Path("/unused")))
    return cfg, str(demo_data / "org-1"), str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(setup):
    return trajectory(*setup)


def test_a_trajectory_agrees_with_a_rerun(setup, reference):
    assert reference["device"] == "cpu"
    assert not disagreements(trajectory(*setup), reference)


def _adamw_with(monkeypatch, lr_factor: float = 1.0, maximize: bool = False):
    import torch

    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: real(params, lr=lr_factor * lr, maximize=maximize, **kw))


@pytest.mark.parametrize("variant", ["reversed update", "update 1.5x too large", "no update after the first step",
                                     "trained towards the wrong target"])
def test_a_wrong_update_is_caught(setup, reference, monkeypatch, variant):
    import torch

    if variant == "reversed update":
        _adamw_with(monkeypatch, maximize=True)
    elif variant == "update 1.5x too large":
        _adamw_with(monkeypatch, lr_factor=1.5)
    elif variant == "no update after the first step":
        real_step, taken = torch.optim.AdamW.step, []

        def step(self, *args, **kwargs):
            if not taken:
                taken.append(1)
                return real_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    else:
        from app.model import LoraUNet

        monkeypatch.setattr(LoraUNet, "_target", lambda self, latents, noise, timesteps: latents)
    problems = disagreements(trajectory(*setup), reference)
    print(variant, problems)
    assert problems, f"{variant}: the check did not notice"


def test_a_reference_that_did_not_train_proves_nothing(setup, reference):
    still = reference | {"change": [0.0] * len(reference["change"]), "losses": [1.0] * len(reference["losses"])}
    assert "did not train" in " ".join(disagreements(still, still))
