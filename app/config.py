"""Typed views of the run config (pyproject's [tool.flwr.app.config]) and a node's --node-config.

Defaults live in pyproject.toml only; this module checks types and ranges so that a bad value is
reported once, by name, before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

AGGREGATIONS = ("secagg+", "fedavg")
ORG_METRICS = ("shared", "private")
PRECISIONS = ("auto", "no", "bf16")


class ConfigError(ValueError):
    """A run or node setting is missing or invalid; the message names it and the fix."""


def _get(cfg: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in cfg:
        raise ConfigError(f"run config has no '{key}': is pyproject.toml's [tool.flwr.app.config] complete?")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"run config '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"run config '{key}' must be > 0, got {value}")


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int
    base_model: str
    lora_rank: int
    lora_alpha: int
    lora_targets: tuple[str, ...]
    resolution: int
    batch_size: int
    local_steps: int
    learning_rate: float
    mixed_precision: str
    compile: bool
    seed: int
    heldout_fraction: float
    eval_timesteps: int
    aggregation: str
    org_metrics: str
    max_images_per_node: int
    min_nodes: int
    node_wait_timeout: float
    prepare_timeout: float
    round_timeout: float
    output_dir: Path
    sample_every: int
    sample_steps: int
    sample_prompts: tuple[str, ...]

    @classmethod
    def from_flower(cls, cfg: Mapping[str, Any]) -> RunConfig:
        c = cls(
            num_rounds=_get(cfg, "num-server-rounds", int),
            base_model=_get(cfg, "base-model", str),
            lora_rank=_get(cfg, "lora-rank", int),
            lora_alpha=_get(cfg, "lora-alpha", int),
            lora_targets=tuple(t.strip() for t in _get(cfg, "lora-target-modules", str).split(",") if t.strip()),
            resolution=_get(cfg, "resolution", int),
            batch_size=_get(cfg, "batch-size", int),
            local_steps=_get(cfg, "local-steps", int),
            learning_rate=_get(cfg, "learning-rate", float),
            mixed_precision=_get(cfg, "mixed-precision", str),
            compile=_get(cfg, "compile", bool),
            seed=_get(cfg, "seed", int),
            heldout_fraction=_get(cfg, "heldout-fraction", float),
            eval_timesteps=_get(cfg, "eval-timesteps", int),
            aggregation=_get(cfg, "aggregation", str),
            org_metrics=_get(cfg, "org-metrics", str),
            max_images_per_node=_get(cfg, "max-images-per-node", int),
            min_nodes=_get(cfg, "min-nodes", int),
            node_wait_timeout=_get(cfg, "node-wait-timeout", float),
            prepare_timeout=_get(cfg, "prepare-timeout", float),
            round_timeout=_get(cfg, "round-timeout", float),
            output_dir=Path(_get(cfg, "output-dir", str)),
            sample_every=_get(cfg, "sample-every", int),
            sample_steps=_get(cfg, "sample-steps", int),
            sample_prompts=tuple(p.strip() for p in _get(cfg, "sample-prompts", str).split("|") if p.strip()),
        )
        c._validate()
        return c

    def _validate(self) -> None:
        for key, value in [
            ("num-server-rounds", self.num_rounds), ("lora-rank", self.lora_rank),
            ("lora-alpha", self.lora_alpha), ("resolution", self.resolution),
            ("batch-size", self.batch_size), ("local-steps", self.local_steps),
            ("learning-rate", self.learning_rate), ("eval-timesteps", self.eval_timesteps),
            ("node-wait-timeout", self.node_wait_timeout), ("prepare-timeout", self.prepare_timeout),
            ("round-timeout", self.round_timeout),
            ("sample-steps", self.sample_steps), ("max-images-per-node", self.max_images_per_node),
        ]:
            _positive(key, value)
        if self.resolution % 8:
            raise ConfigError(f"run config 'resolution' must be a multiple of 8, got {self.resolution}")
        if not self.lora_targets:
            raise ConfigError("run config 'lora-target-modules' is empty: name at least one, e.g. 'to_q,to_v'")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"run config 'heldout-fraction' must be in (0, 1), got {self.heldout_fraction}")
        if self.mixed_precision == "fp16":
            # fp16 training needs loss scaling (GradScaler), or small gradients underflow to zero and
            # the adapter silently stops learning; bf16 has fp32's range and needs none.
            raise ConfigError(
                "run config 'mixed-precision' is 'fp16', which trains without loss scaling here: use "
                "'bf16' (NVIDIA Ampere or newer) or 'no' (fp32); 'auto' picks bf16 where the GPU has it"
            )
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"run config 'mixed-precision' must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"run config 'aggregation' must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.org_metrics not in ORG_METRICS:
            raise ConfigError(f"run config 'org-metrics' must be one of {ORG_METRICS}, got {self.org_metrics!r}")
        if self.org_metrics == "private" and self.aggregation != "secagg+":
            # Plain FedAvg hands the coordinator every node's update: hiding its losses would be theatre.
            raise ConfigError(
                f"run config org-metrics=\"private\" needs aggregation=\"secagg+\" (got {self.aggregation!r}): "
                "under plain FedAvg the coordinator sees every organisation's update anyway"
            )
        # SecAgg+ needs at least two participants to mask anything; Flower refuses fewer.
        if self.min_nodes < (2 if self.aggregation == "secagg+" else 1):
            raise ConfigError(f"run config 'min-nodes' is {self.min_nodes}: secagg+ needs at least 2 (3 to hide anything)")
        if not self.output_dir.is_absolute():
            raise ConfigError(
                f"run config 'output-dir' must be an absolute path (the ServerApp's working directory is "
                f"the SuperLink's), got {str(self.output_dir)!r}"
            )
        if self.sample_every < 0:
            raise ConfigError(f"run config 'sample-every' must be >= 0, got {self.sample_every}")

    @property
    def model_identity(self) -> dict[str, Any]:
        """What a run's checkpoints and losses depend on: resuming with other values is refused.

        Model and LoRA shape: other values would mix two different adapters. Seed and held-out
        fraction: they pick the held-out images and the evaluation noise, so other values would make
        later rounds' held-out losses incomparable with the earlier ones (and could evaluate on
        images already trained on).
        """
        return {
            "base-model": self.base_model, "lora-rank": self.lora_rank, "lora-alpha": self.lora_alpha,
            "lora-target-modules": ",".join(self.lora_targets),
            "seed": self.seed, "heldout-fraction": self.heldout_fraction,
        }


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    org: str
    default_caption: str | None
    cache_dir: Path
    # False: the organisation takes part only in runs that keep its own figures from the coordinator.
    share_metrics: bool = True

    @classmethod
    def from_flower(cls, cfg: Mapping[str, Any]) -> NodeConfig:
        missing = [k for k in ("data-dir", "org") if not str(cfg.get(k, "")).strip()]
        if missing:
            raise ConfigError(
                f"SuperNode --node-config lacks {', '.join(missing)}: start it with "
                "--node-config 'data-dir=\"/data\" org=\"my-org\"'"
            )
        cache = cfg.get("cache-dir") or os.environ.get("FEDLORA_CACHE") or (
            Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "fedlora"
        )
        caption = str(cfg.get("default-caption", "")).strip() or None
        share = cfg.get("share-metrics", True)
        if not isinstance(share, bool):
            raise ConfigError(f"SuperNode --node-config 'share-metrics' must be true or false (unquoted), got {share!r}")
        return cls(Path(str(cfg["data-dir"])), str(cfg["org"]), caption, Path(str(cache)), share)
