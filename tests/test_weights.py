"""Only LoRA tensors travel, in one key order, and they really land in the UNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import RunConfig
from app.outputs import read_adapter, write_adapter
from conftest import tiny_run_config, with_defaults


@pytest.fixture(scope="module")
def cfg(tiny_model) -> RunConfig:
    return RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))


def test_only_lora_tensors_in_sorted_order(cfg):
    from app.model import LoraUNet, lora_state

    net = LoraUNet.load(cfg)
    state = lora_state(net.unet)
    assert list(state) == sorted(state) == net.names
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} <= {"to_q", "to_k", "to_v", "0"}
    trainable = sum(p.numel() for p in net.unet.parameters() if p.requires_grad)
    assert sum(a.size for a in state.values()) == trainable


def test_same_seed_same_initial_adapter_everywhere(cfg):
    from app.model import LoraUNet, lora_state, weights_fingerprint

    a, b = LoraUNet.load(cfg), LoraUNet.load(cfg)
    assert weights_fingerprint(list(lora_state(a.unet).values())) == weights_fingerprint(list(lora_state(b.unet).values()))


def test_round_trip_into_a_fresh_unet(cfg):
    from app.model import LoraUNet, load_lora, lora_state, weights_fingerprint

    rng = np.random.default_rng(0)
    sent = [rng.normal(size=a.shape).astype(np.float32) for a in lora_state(LoraUNet.load(cfg).unet).values()]
    receiver = LoraUNet.load(cfg)
    fingerprint = load_lora(receiver.unet, receiver.names, sent)
    assert fingerprint == weights_fingerprint(sent)
    for got, want in zip(lora_state(receiver.unet).values(), sent):
        assert np.array_equal(got, want)


def test_weights_that_do_not_land_are_an_error(cfg):
    """The public examples' bug: names with '.default' (from unet.state_dict()) match nothing."""
    from peft.utils import get_peft_model_state_dict

    from app.model import LoraUNet, load_lora

    net = LoraUNet.load(cfg)
    wrong_names = sorted(k for k in net.unet.state_dict() if "lora" in k)
    assert wrong_names[0].endswith(".default.weight")
    arrays = [np.ones(a.shape, np.float32) for a in get_peft_model_state_dict(net.unet).values()]
    with pytest.raises((RuntimeError, ValueError)):
        load_lora(net.unet, wrong_names, arrays)
    with pytest.raises(ValueError, match="run settings differ"):
        load_lora(net.unet, net.names, arrays[:-1])


def test_adapter_file_round_trip_and_diffusers_load(cfg, tiny_model, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from app.model import LoraUNet, lora_state

    rng = np.random.default_rng(1)
    state = {k: rng.normal(scale=0.5, size=v.shape).astype(np.float32) for k, v in lora_state(LoraUNet.load(cfg).unet).items()}
    path = write_adapter(tmp_path, state)
    assert path.stat().st_mode & 0o077 == 0  # diffusers writes 0600: adapters are not world-readable
    back = read_adapter(tmp_path)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.load_lora_weights(tmp_path)
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert len(loaded) == len(state)
    some = next(k for k in state if "lora_B" in k)
    got = next(v for k, v in loaded.items() if k.startswith(some.replace(".weight", "")))
    assert torch.equal(got, torch.from_numpy(state[some]))
