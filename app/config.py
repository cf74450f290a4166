"""Typed views of the run config (pyproject's [tool.flwr.app.config]) and a node's --node-config.

Defaults live in pyproject.toml only; this module checks types and ranges so that a bad value is
reported once, by name, before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

AGGREGATIONS = ("secagg+", "fedavg", "robust")
WEIGHTINGS = ("examples", "equal")
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
    max_weight_per_org: int
    weighting: str
    robust_trim: int
    max_images_per_node: int
    min_nodes: int
    node_wait_timeout: float
    prepare_timeout: float
    round_timeout: float
    output_dir: Path
    sample_every: int
    sample_steps: int
    sample_prompts: tuple[str, ...]
    sim_data_dir: str

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
            max_weight_per_org=_get(cfg, "max-weight-per-org", int),
            weighting=_get(cfg, "weighting", str),
            robust_trim=_get(cfg, "robust-trim", int),
            max_images_per_node=_get(cfg, "max-images-per-node", int),
            min_nodes=_get(cfg, "min-nodes", int),
            node_wait_timeout=_get(cfg, "node-wait-timeout", float),
            prepare_timeout=_get(cfg, "prepare-timeout", float),
            round_timeout=_get(cfg, "round-timeout", float),
            output_dir=Path(_get(cfg, "output-dir", str)),
            sample_every=_get(cfg, "sample-every", int),
            sample_steps=_get(cfg, "sample-steps", int),
            sample_prompts=tuple(p.strip() for p in _get(cfg, "sample-prompts", str).split("|") if p.strip()),
            sim_data_dir=_get(cfg, "sim-data-dir", str),
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
            ("max-weight-per-org", self.max_weight_per_org), ("robust-trim", self.robust_trim),
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
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"run config 'weighting' must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.weighting == "equal" and self.aggregation == "secagg+":
            # Under SecAgg+ each node scales its own masked vector by its own example count.
            raise ConfigError(
                "run config weighting=\"equal\" needs aggregation=\"fedavg\" (or \"robust\", whose trimmed mean "
                "weighs every organisation equally anyway): under secagg+ each node weights its masked update by its "
                "own example count, bounded by max-weight-per-org")
        if self.aggregation == "robust" and self.min_nodes < 2 * self.robust_trim + 1:
            # The trimmed mean drops robust-trim values at each end of every coordinate: something must remain.
            raise ConfigError(
                f"run config aggregation=\"robust\" with robust-trim={self.robust_trim} needs min-nodes >= "
                f"{2 * self.robust_trim + 1}, got {self.min_nodes}: lower robust-trim or raise min-nodes")
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


def is_simulated_node(node_config: Mapping[str, Any]) -> bool:
    """A node of Flower's Simulation Engine: it gets only partition-id and num-partitions.

    A SuperNode of this project always has data-dir and org (--node-config); a node that has them
    is never treated as simulated."""
    return ("partition-id" in node_config and "num-partitions" in node_config
            and "data-dir" not in node_config and "org" not in node_config)


def _default_cache() -> str | Path:
    return os.environ.get("FEDLORA_CACHE") or (
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "fedlora"
    )


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    org: str
    default_caption: str | None
    cache_dir: Path
    # False: the organisation takes part only in runs that keep its own figures from the coordinator.
    share_metrics: bool = True
    # True: a long-lived trainer beside the node keeps the model and latents between messages
    # (app/trainer.py); False: every message loads them in its own ClientApp process.
    warm_trainer: bool = True
    # Seconds a warm trainer waits for the next message before it exits and frees its memory.
    warm_trainer_idle: float = 1800.0
    # Data-parallel training processes of the warm trainer (app/parallel.py); None ("auto"): one per
    # visible GPU, one on a CPU.
    train_processes: int | None = None
    # SecAgg+ floor (app/node_guard.py): the fewest other nodes whose key shares this node must hold
    # before it sends a masked update. 1 lets a round of two through, where each learns the other's.
    min_peers: int = 2
    # True: a training message outside SecAgg+ gets an error, whatever the run's aggregation says.
    # Off here (the demo compares plain FedAvg); the join kit turns it on (docker/join/.env).
    require_secagg: bool = False

    @classmethod
    def from_flower(cls, cfg: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> NodeConfig:
        if run_config is not None and is_simulated_node(cfg):
            return cls.simulated(int(cfg["partition-id"]), _get(run_config, "sim-data-dir", str))
        missing = [k for k in ("data-dir", "org") if not str(cfg.get(k, "")).strip()]
        if missing:
            raise ConfigError(
                f"SuperNode --node-config lacks {', '.join(missing)}: start it with "
                "--node-config 'data-dir=\"/data\" org=\"my-org\"'"
            )
        cache = cfg.get("cache-dir") or _default_cache()
        caption = str(cfg.get("default-caption", "")).strip() or None
        share, warm = (cfg.get(key, True) for key in ("share-metrics", "warm-trainer"))
        require_secagg = cfg.get("require-secagg", cls.require_secagg)
        for key, value in (("share-metrics", share), ("warm-trainer", warm), ("require-secagg", require_secagg)):
            if not isinstance(value, bool):
                raise ConfigError(f"SuperNode --node-config '{key}' must be true or false (unquoted), got {value!r}")
        idle = cfg.get("warm-trainer-idle", cls.warm_trainer_idle)
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0:
            raise ConfigError(f"SuperNode --node-config 'warm-trainer-idle' must be a number of seconds > 0, got {idle!r}")
        processes = cfg.get("train-processes", "auto")
        if processes != "auto" and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
            raise ConfigError(f"SuperNode --node-config 'train-processes' must be \"auto\" (one per GPU) or a number "
                              f">= 1 (unquoted), got {processes!r}")
        min_peers = cfg.get("min-peers", cls.min_peers)
        if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 1:
            raise ConfigError(f"SuperNode --node-config 'min-peers' must be a number >= 1 (unquoted): the fewest other "
                              f"organisations in a SecAgg+ round this node sends its update into; got {min_peers!r}")
        return cls(Path(str(cfg["data-dir"])), str(cfg["org"]), caption, Path(str(cache)), share, warm, float(idle),
                   None if processes == "auto" else processes, min_peers, require_secagg)

    @classmethod
    def simulated(cls, partition_id: int, sim_data_dir: str) -> NodeConfig:
        """Simulated node N (partition-id N-1) is organisation org-N reading <sim-data-dir>/org-N: the
        layout `make demo-data` writes. Only the ServerApp of a simulation admits it by that name."""
        org = f"org-{partition_id + 1}"
        root = Path(sim_data_dir)
        if not root.is_dir():
            where = f" (relative to {Path.cwd()}, where the simulation runs)" if not root.is_absolute() else ""
            raise ConfigError(
                f"simulated node partition-id={partition_id} ({org}) reads {root.resolve() / org}, but run config "
                f"sim-data-dir={sim_data_dir!r}{where} is not a directory: write demo data (`make demo-data`) or "
                "pass an absolute path, e.g. --run-config 'sim-data-dir=\"/path/to/data\"'"
            )
        if not (root / org).is_dir():
            present = sorted(d.name for d in root.iterdir() if d.is_dir())
            raise ConfigError(
                f"simulated node partition-id={partition_id} reads {root.resolve() / org}, which does not exist "
                f"({root.resolve()} holds {', '.join(present) or 'no folder'}): simulate as many nodes as there are "
                "organisation folders (num-supernodes), or write more (`make demo-data`)"
            )
        # Flower's Simulation Engine runs the ClientApps in its own worker processes: no warm trainers.
        return cls((root / org).resolve(), org, None, Path(str(_default_cache())), warm_trainer=False)
