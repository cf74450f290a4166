"""A base model whose scheduler predicts velocity (prediction_type "v_prediction", e.g. Stable
Diffusion 2.x at 768 px): training and the held-out loss use the velocity target, computed here by
hand from the scheduler's noise schedule, v = sqrt(a_t) * noise - sqrt(1 - a_t) * latents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.config import NodeConfig, RunConfig
from conftest import tiny_run_config, with_defaults

STEPS, BATCH, LR, SEED = 4, 4, 1e-3, 5


@pytest.fixture(scope="module")
def v_model(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-v") / "tiny-sd"
    shutil.copytree(tiny_model, path)
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "v_prediction"}))
    return path


def velocity(net, latents, noise, timesteps):
    a = net.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def reference_losses(net, data, target) -> list[float]:
    """tests/test_train_step.py's plain loop, with the target as a parameter."""
    import torch
    import torch.nn.functional as F

    from app.secagg import ADAM_BETAS

    net.unet.train()
    params = [p for p in net.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=ADAM_BETAS, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    n = len(data.train_latents)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(STEPS * BATCH // n + 1)])
    losses = []
    for step in range(STEPS):
        idx = order[step * BATCH:(step + 1) * BATCH]
        latents = data.train_latents[idx]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, net.scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = net.unet(net.scheduler.add_noise(latents, noise, t), t, data.train_embeds[idx]).sample.float()
        loss = F.mse_loss(pred, target(net, latents, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def setup(v_model, demo_data, tmp_path_factory):
    from app import model

    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(v_model, Path("/unused"))))
    data = model.prepare_data(cfg, NodeConfig(demo_data / "org-1", "org-1", None, tmp_path_factory.mktemp("cache")))
    return cfg, data


def test_training_on_a_v_prediction_model_uses_the_velocity_target(setup):
    import numpy as np

    from app.model import LoraUNet

    cfg, data = setup
    net = LoraUNet.load(cfg)
    assert net.scheduler.config.prediction_type == "v_prediction"
    stats = net.train(data, STEPS, BATCH, LR, SEED)
    want = reference_losses(LoraUNet.load(cfg), data, velocity)
    assert stats["train_loss"] == pytest.approx(np.mean(want), rel=1e-6)
    # The negative variant: the noise target (what an epsilon model trains on) gives other numbers.
    noise_target = reference_losses(LoraUNet.load(cfg), data, lambda net, latents, noise, t: noise)
    assert stats["train_loss"] != pytest.approx(np.mean(noise_target), rel=1e-3)


def test_the_heldout_loss_of_a_v_prediction_model_uses_the_velocity_target(setup):
    import torch
    import torch.nn.functional as F

    from app.model import LoraUNet

    cfg, data = setup
    net = LoraUNet.load(cfg)
    net.unet.eval()
    grid = torch.linspace(0, net.scheduler.config.num_train_timesteps - 1, cfg.eval_timesteps).round().long()
    total = count = 0
    with torch.no_grad():
        for i in range(len(data.heldout_latents)):
            noise = torch.randn((cfg.eval_timesteps, *data.heldout_latents.shape[1:]),
                                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + i))
            latents = data.heldout_latents[i:i + 1].expand(cfg.eval_timesteps, -1, -1, -1)
            embeds = data.heldout_embeds[i:i + 1].expand(cfg.eval_timesteps, -1, -1)
            pred = net.unet(net.scheduler.add_noise(latents, noise, grid), grid, embeds).sample.float()
            total += F.mse_loss(pred, velocity(net, latents, noise, grid), reduction="sum").item() / latents[0].numel()
            count += len(grid)
    got = net.heldout_loss(data, cfg.eval_timesteps, cfg.seed, batch_size=cfg.eval_timesteps)
    assert got == pytest.approx(total / count, rel=1e-5)
