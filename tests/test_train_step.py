"""The training step: same numbers as the plain per-step loop, without reading the device every step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import NodeConfig, RunConfig
from conftest import tiny_run_config, with_defaults

STEPS, BATCH, LR, SEED = 10, 4, 1e-3, 1234


@pytest.fixture(scope="module")
def cfg(tiny_model) -> RunConfig:
    return RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))


@pytest.fixture(scope="module")
def data(cfg, demo_data, tmp_path_factory):
    from app import model

    return model.prepare_data(cfg, NodeConfig(demo_data / "org-2", "org-2", None, tmp_path_factory.mktemp("cache")))


def reference_train(net, data, steps: int, batch_size: int, learning_rate: float, seed: int) -> list[float]:
    """The straightforward loop (the code before it was optimised): host reads every step.

    Kept here as the specification of what a training run computes: the random draws come from
    one CPU generator in this order (epoch permutations, then per step noise and timesteps).
    """
    import torch
    import torch.nn.functional as F

    from app.secagg import ADAM_BETAS

    net.unet.train()
    params = [p for p in net.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=ADAM_BETAS, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train_latents)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * batch_size // n + 1)])
    num_t = net.scheduler.config.num_train_timesteps
    losses = []
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        latents = data.train_latents[idx]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, num_t, (len(idx),), generator=gen)
        noisy = net.scheduler.add_noise(latents, noise, timesteps)
        pred = net.unet(noisy, timesteps, data.train_embeds[idx]).sample.float()
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_training_computes_what_the_plain_loop_computes(cfg, data):
    from app.model import LoraUNet, lora_state

    assert data.num_train < STEPS * BATCH  # several epochs: reshuffles are part of what is compared
    ref, net = LoraUNet.load(cfg), LoraUNet.load(cfg)
    start = {k: v.copy() for k, v in lora_state(net.unet).items()}  # on CPU they alias the parameters
    losses = reference_train(ref, data, STEPS, BATCH, LR, SEED)
    stats = net.train(data, STEPS, BATCH, LR, SEED)

    assert stats["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    want, got = lora_state(ref.unet), lora_state(net.unet)
    assert list(got) == list(want)
    for name in want:
        # Trained (not just equal because nothing moved) and equal to the plain loop's result.
        assert not np.array_equal(got[name], start[name]), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_attention_runs_through_pytorchs_fused_kernel(cfg):
    """SDPA: flash or memory-efficient attention on GPUs, never the attention matrix in memory."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from app.model import LoraUNet

    processors = LoraUNet.load(cfg).unet.attn_processors
    assert len(processors) == 12  # self- and cross-attention in each of the tiny UNet's six transformers
    assert all(type(p) is AttnProcessor2_0 for p in processors.values())


def test_a_non_finite_loss_names_the_first_bad_step(cfg, data):
    import torch

    from app.model import EncodedData, LoraUNet, NonFiniteLoss

    # One poisoned image: the first step whose batch draws it is the first with a NaN loss.
    poisoned = data.train_latents.clone()
    poisoned[3] = float("nan")
    bad = EncodedData(poisoned, data.train_embeds, data.heldout_latents, data.heldout_embeds, [])
    gen = torch.Generator().manual_seed(SEED)
    n = data.num_train
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(STEPS * BATCH // n + 1)])
    first = int((order == 3).nonzero()[0]) // BATCH
    with pytest.raises(NonFiniteLoss, match=f"training loss is nan at local step {first}:"):
        LoraUNet.load(cfg).train(bad, STEPS, BATCH, LR, SEED)


def test_the_loop_reads_the_device_only_at_progress_points(cfg, data, monkeypatch):
    """Every read of a device tensor's value on the host waits for all queued work to finish.

    Counted on CPU by the Python entry points that read a value back, called from the training
    loop's own code (torch's CPU optimizer reads its CPU step counters, which cost no sync): on a
    GPU each would drain the queue.
    """
    import sys

    import torch

    from app import model

    net = model.LoraUNet.load(cfg)
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == model.__file__:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps, seen = 40, []
    net.train(data, steps, BATCH, LR, SEED, on_step=seen.append)
    monkeypatch.undo()
    assert len(seen) == steps and all(s > 0 for s in seen)  # the step-time histogram still gets every step
    assert len(reads) <= 2 * 5 + 2, reads  # a few per progress point (5 of them), not per step
