"""The ClientApp each organisation's SuperNode runs on its own data.

Message by message (each in a fresh process under Flower 1.41):
- get_properties ("prepare"): encode the node's images once into the latent cache; report counts.
- fit: load the global adapter, measure its held-out loss, train, return the *update*
  (local - global). Under SecAgg+ the secaggplus_mod masks it, so the coordinator only ever sees
  the sum over all nodes.
- evaluate: held-out loss of the final global adapter, which no later fit will measure.
The SecAgg+ key-exchange stages never reach the client below, so torch is imported only on the
stages that train or evaluate.
"""

from __future__ import annotations

import hashlib
import time
from logging import INFO

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from . import metrics
from .config import NodeConfig, RunConfig
from .secagg import adam_update_bound


def round_seed(seed: int, rnd: int, org: str) -> int:
    """Distinct, reproducible randomness per (run seed, round, organisation)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rnd}:{org}".encode()).digest()[:7], "big")


def local_update(cfg: RunConfig, node: NodeConfig, global_arrays: list[np.ndarray], rnd: int):
    """One organisation's round: returns (update arrays, example count, metrics).

    Deterministic given its inputs, which is what lets tests recompute an update outside Flower.
    """
    from . import model

    t0 = time.perf_counter()
    data = model.prepare_data(cfg, node)
    net = model.LoraUNet.load(cfg)
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
        stats = net.train(data, cfg.local_steps, cfg.batch_size, cfg.learning_rate,
                          round_seed(cfg.seed, rnd, node.org), on_step=step_seconds.observe)
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
        raise RuntimeError(f"[{node.org}] update of size {worst:.3g} exceeds the SecAgg+ clipping range {bound:.3g}; "
                           "it would be clipped. Was the optimizer changed?")
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


class LoraClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.cfg = RunConfig.from_flower(context.run_config)
        self.node = NodeConfig.from_flower(context.node_config)

    def get_properties(self, config):
        from . import model

        t0 = time.perf_counter()
        data = model.prepare_data(self.cfg, self.node)
        metrics.IMAGES_SKIPPED.labels(self.node.org).set(len(data.skipped))
        log(INFO, "[%s] data ready: %d train, %d held out, %d unreadable skipped (%.1f s)", self.node.org,
            data.num_train, data.num_heldout, len(data.skipped), time.perf_counter() - t0)
        return {"org": self.node.org, "num-train": data.num_train, "num-heldout": data.num_heldout,
                "skipped-images": len(data.skipped)}

    def fit(self, parameters, config):
        return local_update(self.cfg, self.node, parameters, int(config["server-round"]))

    def evaluate(self, parameters, config):
        from . import model

        t0 = time.perf_counter()
        data = model.prepare_data(self.cfg, self.node)
        net = model.LoraUNet.load(self.cfg)
        received = model.load_lora(net.unet, net.names, parameters)
        loss = net.heldout_loss(data, self.cfg.eval_timesteps, self.cfg.seed, self.cfg.batch_size)
        metrics.HELDOUT_LOSS.labels(self.node.org).set(loss)
        log(INFO, "[%s] round %s: held-out loss %.5f on %d images", self.node.org, config.get("server-round"),
            loss, data.num_heldout)
        return loss, data.num_heldout, {"org": self.node.org, "heldout_loss": loss, "received_fingerprint": received,
                                        "eval_seconds": time.perf_counter() - t0}


def secagg_when_asked(msg, ctxt, call_next):
    """secaggplus_mod only understands SecAgg+ train messages; plain FedAvg ones pass it by."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp(client_fn=lambda context: LoraClient(context).to_client(), mods=[secagg_when_asked])
