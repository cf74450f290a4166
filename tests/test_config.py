"""Bad settings are reported by name, with the fix, before any work starts."""

from __future__ import annotations

import pytest

from app.config import ConfigError, NodeConfig, RunConfig
from conftest import with_defaults


def test_defaults_are_valid_and_real():
    cfg = RunConfig.from_flower(with_defaults({}))
    assert cfg.base_model == "segmind/tiny-sd" and cfg.aggregation == "secagg+" and cfg.resolution == 512
    assert cfg.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert cfg.compile is False  # a compilation per ClientApp process costs more than it saves


@pytest.mark.parametrize("key,value,message", [
    ("output-dir", "outputs", "absolute path"),
    ("aggregation", "secagg", "one of"),
    ("resolution", 100, "multiple of 8"),
    ("learning-rate", -1.0, "> 0"),
    ("heldout-fraction", 1.0, r"\(0, 1\)"),
    ("min-nodes", 1, "secagg\\+ needs at least 2"),
    ("lora-target-modules", " , ", "empty"),
    ("local-steps", "10", "must be int"),
    # Training in fp16 without loss scaling lets small gradients underflow to zero.
    ("mixed-precision", "fp16", "fp16.*loss scaling.*'bf16'.*'no'"),
    ("org-metrics", "hidden", "one of"),
    ("max-images-per-node", 0, "> 0"),
    ("prepare-timeout", 0, "prepare-timeout. must be > 0"),
    ("compile", "true", "'compile' must be bool"),
])
def test_invalid_run_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(with_defaults({key: value}))


def test_node_config_requires_data_dir_and_org():
    with pytest.raises(ConfigError, match="data-dir, org"):
        NodeConfig.from_flower({})
    node = NodeConfig.from_flower({"data-dir": "/data", "org": "clinic-a", "cache-dir": "/c"})
    assert str(node.data_dir) == "/data" and node.org == "clinic-a" and node.default_caption is None
    assert node.warm_trainer and node.warm_trainer_idle == 1800
    assert node.train_processes is None  # "auto": one training process per visible GPU
    assert NodeConfig.from_flower({"data-dir": "/data", "org": "clinic-a", "train-processes": 2}).train_processes == 2


@pytest.mark.parametrize("key,value,message", [
    ("warm-trainer", "false", "'warm-trainer' must be true or false"),
    ("warm-trainer-idle", 0, "'warm-trainer-idle' must be a number of seconds > 0"),
    ("train-processes", 0, "'train-processes' must be \"auto\" \\(one per GPU\\) or a number >= 1"),
    ("train-processes", "2", "'train-processes' must be"),
    ("min-peers", 0, "'min-peers' must be a number >= 1"),
    ("min-peers", "2", "'min-peers' must be a number >= 1"),
    ("require-secagg", "yes", "'require-secagg' must be true or false"),
])
def test_invalid_node_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_flower({"data-dir": "/data", "org": "clinic-a", key: value})


@pytest.mark.parametrize("gpu,asked,expected", [
    ("ampere", "auto", "bfloat16"),
    ("turing", "auto", None),  # T4, V100: bf16 only emulated; fp32, never unscaled fp16
    ("turing", "no", None),
    (None, "auto", None),
])
def test_precision_picked_for_training(monkeypatch, gpu, asked, expected):
    import torch

    from app import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    # torch's answer by default counts emulated bf16 (slow, pre-Ampere) as supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: gpu == "ampere" or (gpu is not None and including_emulation))
    device, dtype = model.device_and_dtype(asked)
    assert device.type == ("cuda" if gpu else "cpu")
    assert dtype == (getattr(torch, expected) if expected else None)


def test_private_org_metrics_need_secagg():
    with pytest.raises(ConfigError, match=r'org-metrics="private" needs aggregation="secagg\+" \(got \'fedavg\'\)'):
        RunConfig.from_flower(with_defaults({"org-metrics": "private", "aggregation": "fedavg"}))
    assert RunConfig.from_flower(with_defaults({"org-metrics": "private"})).org_metrics == "private"
    assert RunConfig.from_flower(with_defaults({})).org_metrics == "shared"


def test_node_guard_settings_and_their_defaults():
    base = {"data-dir": "/data", "org": "clinic-a"}
    node = NodeConfig.from_flower(base)
    assert (node.min_peers, node.require_secagg) == (2, False)  # the join kit turns require-secagg on
    node = NodeConfig.from_flower(base | {"min-peers": 4, "require-secagg": True})
    assert (node.min_peers, node.require_secagg) == (4, True)


def test_node_share_metrics_is_a_boolean():
    base = {"data-dir": "/data", "org": "clinic-a"}
    assert NodeConfig.from_flower(base).share_metrics is True
    assert NodeConfig.from_flower(base | {"share-metrics": False}).share_metrics is False
    with pytest.raises(ConfigError, match="share-metrics' must be true or false"):
        NodeConfig.from_flower(base | {"share-metrics": "no"})


def test_a_simulated_node_is_org_n_reading_its_folder(tmp_path, monkeypatch):
    run = with_defaults({"sim-data-dir": str(tmp_path)})
    simulated = {"partition-id": 1, "num-partitions": 3}  # all Flower's Simulation Engine gives a node
    (tmp_path / "org-2").mkdir()
    node = NodeConfig.from_flower(simulated, run)
    assert node.org == "org-2" and node.data_dir == tmp_path / "org-2"
    # A SuperNode's own data-dir and org always win: it is never taken for a simulated node.
    assert NodeConfig.from_flower(simulated | {"data-dir": "/data", "org": "clinic-a"}, run).org == "clinic-a"

    with pytest.raises(ConfigError, match=rf"partition-id=2 reads {tmp_path}/org-3, which does not exist "
                                          rf"\({tmp_path} holds org-2\)"):
        NodeConfig.from_flower(simulated | {"partition-id": 2}, run)
    # A relative sim-data-dir is resolved where the simulation runs; the error says where that is.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"reads {tmp_path}/nowhere/org-2, but run config sim-data-dir='nowhere' "
                                          rf"\(relative to {tmp_path}, where the simulation runs\) is not a directory"):
        NodeConfig.from_flower(simulated, with_defaults({"sim-data-dir": "nowhere"}))
