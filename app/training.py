"""One organisation's training steps (prepare, local_update, measure) and where they get the model
and the latents from: `FromDisk`, anew for every message, or the warm trainer's `Resident`.

Whoever trains imports this module, which imports none of them: the ClientApp (node setting
warm-trainer=false trains in its own process), the warm trainer (app/trainer.py) and its other
training processes (app/parallel.py). torch is imported only inside the steps: the ClientApp's side
of a warm node never loads it.
"""

from __future__ import annotations

import hashlib
import time
from logging import ERROR, INFO

import numpy as np
from flwr.common.logger import log

from . import metrics
from .config import NodeConfig, RunConfig
from .secagg import adam_update_bound

# Run settings that shape neither the model nor the latents: other values reuse what is resident.
# Every other setting, including any added later, reloads: slow, but never a stale model.
_PER_MESSAGE = {"num_rounds", "local_steps", "learning_rate", "batch_size", "eval_timesteps", "aggregation",
                "org_metrics", "max_images_per_node", "min_nodes", "node_wait_timeout", "prepare_timeout",
                "round_timeout", "output_dir", "sample_every", "sample_steps", "sample_prompts", "sim_data_dir"}
# Settings that shape the latents only, and the model only.
_DATA_ONLY = {"resolution", "heldout_fraction"}
_MODEL_ONLY = {"lora_rank", "lora_alpha", "lora_targets"}


def round_seed(seed: int, rnd: int, org: str) -> int:
    """Distinct, reproducible randomness per (run seed, round, organisation)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rnd}:{org}".encode()).digest()[:7], "big")


class FromDisk:
    """Where the functions below get the model and the latents without a warm trainer: from disk,
    anew for every message. The warm trainer passes its own `Resident`, which keeps them."""

    @staticmethod
    def data(cfg: RunConfig, node: NodeConfig):
        from . import model

        return model.prepare_data(cfg, node)

    @staticmethod
    def net(cfg: RunConfig):
        from . import model

        return model.LoraUNet.load(cfg)

    @staticmethod
    def train(net, data, cfg: RunConfig, node: NodeConfig, seed: int, on_step):
        return net.train(data, cfg.local_steps, cfg.batch_size, cfg.learning_rate, seed, on_step=on_step)


def prepare(cfg: RunConfig, node: NodeConfig, resident=FromDisk) -> dict:
    """The prepare reply: encode the node's images into the latent cache (once) and count them."""
    t0 = time.perf_counter()
    data = resident.data(cfg, node)
    metrics.IMAGES_SKIPPED.labels(node.org).set(len(data.skipped))
    log(INFO, "[%s] data ready: %d train, %d held out, %d unusable skipped (%.1f s)", node.org,
        data.num_train, data.num_heldout, len(data.skipped), time.perf_counter() - t0)
    if cfg.org_metrics == "private":
        return {"org": node.org}
    return {"org": node.org, "num-train": data.num_train, "num-heldout": data.num_heldout,
            "skipped-images": len(data.skipped)}


def local_update(cfg: RunConfig, node: NodeConfig, global_arrays: list[np.ndarray], rnd: int, resident=FromDisk):
    """One organisation's round: returns (update arrays, example count, metrics).

    Deterministic given its inputs, which is what lets tests recompute an update outside Flower.
    """
    from . import model

    t0 = time.perf_counter()
    data = resident.data(cfg, node)
    net = resident.net(cfg)
    received = model.load_lora(net.unet, net.names, global_arrays)
    # Evaluate what was received before training on it: the held-out loss of the previous
    # round's global adapter (of the base model in round 1) without a separate evaluate message.
    t_eval = time.perf_counter()
    heldout = net.heldout_loss(data, cfg.eval_timesteps, cfg.seed, cfg.batch_size)
    eval_seconds = time.perf_counter() - t_eval
    # Exported before training, which stops the node on a non-finite loss: the alert on these
    # gauges (FedloraNonFiniteLoss) must see the bad value.
    metrics.HELDOUT_LOSS.labels(node.org).set(heldout)
    log(INFO, "[%s] round %d: global %s has held-out loss %.5f; training %d steps on %d images", node.org, rnd,
        received, heldout, cfg.local_steps, data.num_train)
    step_seconds = metrics.STEP_SECONDS.labels(node.org)
    try:
        stats = resident.train(net, data, cfg, node, round_seed(cfg.seed, rnd, node.org), step_seconds.observe)
    except model.NonFiniteLoss as err:
        metrics.TRAIN_LOSS.labels(node.org).set(err.loss)
        raise
    local = model.lora_state(net.unet)
    update = [local[name] - np.asarray(g, dtype=np.float32) for name, g in zip(net.names, global_arrays)]

    # The SecAgg+ clipping range is derived from this bound (app/secagg.py); anything beyond it
    # would be clipped silently by Flower, so refuse to send it.
    bound = adam_update_bound(cfg.learning_rate, cfg.local_steps)
    worst = max(float(np.max(np.abs(u))) for u in update)
    if not np.isfinite(worst) or worst > bound:
        # The size stays in this node's log: the error message itself reaches the coordinator.
        log(ERROR, "[%s] round %d: largest update entry %.3g, train loss %s", node.org, rnd, worst, stats.get("train_loss"))
        raise RuntimeError(f"[{node.org}] update exceeds the SecAgg+ clipping range {bound:.3g} (or is not finite); "
                           "it would be clipped. Did training diverge, or was the optimizer changed?")
    report = {"org": node.org, "received_fingerprint": received, "skipped_images": len(data.skipped),
              "heldout_loss": heldout, "num_heldout": data.num_heldout, "eval_seconds": eval_seconds,
              "fit_seconds": time.perf_counter() - t0, **stats}
    _export_round(cfg, node.org, report, sum(u.size for u in update))
    log(INFO, "[%s] round %d: train loss %.4f, %.1f images/s, fit %.1f s", node.org, rnd, stats["train_loss"],
        stats["images_per_second"], report["fit_seconds"])
    return update, data.num_train, report


def _export_round(cfg: RunConfig, org: str, report: dict, num_elements: int) -> None:
    metrics.TRAIN_STEPS.labels(org).inc(cfg.local_steps)
    metrics.TRAIN_EXAMPLES.labels(org).inc(cfg.local_steps * cfg.batch_size)
    metrics.ROUNDS_TRAINED.labels(org).inc()
    metrics.TRAIN_LOSS.labels(org).set(report["train_loss"])
    metrics.IMAGES_PER_SECOND.labels(org).set(report["images_per_second"])
    metrics.IMAGES_SKIPPED.labels(org).set(report["skipped_images"])
    if "accelerator_memory_peak_bytes" in report:
        metrics.ACCEL_MEMORY_PEAK.labels(org).set(report["accelerator_memory_peak_bytes"])
    metrics.SENT_BYTES.labels(org).inc(metrics.update_bytes(num_elements, cfg.aggregation == "secagg+"))
    metrics.LAST_ROUND.labels(org).set_to_current_time()


def measure(cfg: RunConfig, node: NodeConfig, global_arrays: list[np.ndarray], rnd, resident=FromDisk):
    """The held-out loss of a global adapter no later fit will measure: (loss, count, metrics)."""
    from . import model

    t0 = time.perf_counter()
    data = resident.data(cfg, node)
    net = resident.net(cfg)
    received = model.load_lora(net.unet, net.names, global_arrays)
    loss = net.heldout_loss(data, cfg.eval_timesteps, cfg.seed, cfg.batch_size)
    metrics.HELDOUT_LOSS.labels(node.org).set(loss)
    log(INFO, "[%s] round %s: held-out loss %.5f on %d images", node.org, rnd, loss, data.num_heldout)
    return loss, data.num_heldout, {"org": node.org, "heldout_loss": loss, "received_fingerprint": received,
                                    "eval_seconds": time.perf_counter() - t0, "num_heldout": data.num_heldout,
                                    "skipped_images": len(data.skipped)}


class Resident:
    """What the trainer keeps between messages, loaded the way the ClientApp would load it."""

    def __init__(self) -> None:
        self._net = self._data = self.model_key = self.data_key = None
        self.counts = {"requests": 0, "model_loads": 0, "data_loads": 0}
        self.training_started_at: float | None = None
        self.group = None  # parallel.Group: the other training processes, where there are any
        self.settings: tuple[dict, dict] = ({}, {})  # the request's run and node config, for the group
        self.refusal: str | None = None  # why this trainer cannot train (its node setting): every request says so

    def net(self, cfg: RunConfig):
        key = _settings(cfg, _PER_MESSAGE | _DATA_ONLY)
        if key != self.model_key:
            self.forget(data=False)
            self._net, self.model_key = FromDisk.net(cfg), key
            self.counts["model_loads"] += 1
        return self._net

    def data(self, cfg: RunConfig, node: NodeConfig):
        from .data import discover, fingerprint

        # The files' fingerprint (names, sizes, times, captions): images added during a run count.
        key = (_settings(cfg, _PER_MESSAGE | _MODEL_ONLY), str(node.data_dir), node.default_caption, str(node.cache_dir),
               fingerprint(discover(node.data_dir, node.default_caption)))
        if key != self.data_key:
            self._data = self.data_key = None
            from . import model

            # On the accelerator once, not at every message.
            self._data, self.data_key = FromDisk.data(cfg, node).to(model.device()), key
            self.counts["data_loads"] += 1
        return self._data

    def train(self, net, data, cfg: RunConfig, node: NodeConfig, seed: int, on_step):
        self.training_started_at = time.time()
        if self.group is None:
            return FromDisk.train(net, data, cfg, node, seed, on_step)
        run_config, node_config = self.settings
        return self.group.train(net, data, cfg, node, seed, on_step,
                                {"run_config": run_config, "node_config": node_config, "files": self.data_key[-1]})

    def forget(self, model: bool = True, data: bool = True) -> None:
        """Drop what is resident and give its memory back (the accelerator's too)."""
        import gc

        import torch

        if model:
            self._net = self.model_key = None
        if data:
            self._data = self.data_key = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _settings(cfg: RunConfig, leave_out: set[str]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in vars(cfg).items() if k not in leave_out))
