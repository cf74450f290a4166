"""The ClientApp each organisation's SuperNode runs on its own data.

Message by message (each in a fresh process under Flower 1.41):
- get_properties ("prepare"): encode the node's images once into the latent cache; report counts.
- fit: load the global adapter, measure its held-out loss, train, return the *update*
  (local - global). Under SecAgg+ the secaggplus_mod masks it, so the coordinator only ever sees
  the sum over all nodes.
- evaluate: held-out loss of the final global adapter, which no later fit will measure.
The SecAgg+ key-exchange stages never reach the client below, so torch is imported only on the
stages that train or evaluate. By default not even there: those stages hand their work to the node's
warm trainer (app/trainer.py), which keeps the model and latents loaded between messages and runs
the same functions below (`prepare`, `local_update`, `measure`) with what it holds.

Under org-metrics="private" the node's own figures leave it only inside the SecAgg+ vector: the
prepare reply carries no counts, the fit reply is re-encoded by `secagg_when_asked` (app/secagg.py's
`private_vector`) before it is masked, and the final measurement is a fit with "measure-only".
A node started with share-metrics=false refuses every message of a run that would reveal them.
"""

from __future__ import annotations

import hashlib
import time
from logging import ERROR, INFO

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from . import metrics, trainer, wire
from .config import ConfigError, NodeConfig, RunConfig
from .secagg import adam_update_bound, private_vector

# What a fit reply may carry in plain under org-metrics="private": the fingerprint of the global
# weights the node loaded (a hash of what the coordinator sent; it says nothing about the data).
PUBLIC_FIT_METRICS = ("received_fingerprint",)


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


class LoraClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.cfg = RunConfig.from_flower(context.run_config)
        self.node = NodeConfig.from_flower(context.node_config, context.run_config)
        # The node's warm trainer does the work with the model and latents it keeps (node setting
        # warm-trainer, default true); None: this process loads them itself.
        self.warm = trainer.connection(self.node, context.run_config, context.node_config)

    def get_properties(self, config):
        if self.warm:
            return self.warm.prepare(self.cfg)
        return prepare(self.cfg, self.node)

    # Messages carry the adapter as one vector (app/wire.py); everything here works on its matrices.
    def fit(self, parameters, config):
        if config.get("measure-only"):
            # org-metrics="private": the final adapter's held-out loss, sent through SecAgg+ as a fit.
            _, _, report = self.evaluate(parameters, config)
            return [], 0, report
        global_arrays = wire.unpack(parameters, config[wire.SHAPES_KEY])
        if self.warm:
            update, n, report = self.warm.fit(self.cfg, global_arrays, int(config["server-round"]))
        else:
            update, n, report = local_update(self.cfg, self.node, global_arrays, int(config["server-round"]))
        return wire.pack(update), n, report

    def evaluate(self, parameters, config):
        global_arrays = wire.unpack(parameters, config[wire.SHAPES_KEY])
        if self.warm:
            return self.warm.evaluate(self.cfg, global_arrays, config.get("server-round"))
        return measure(self.cfg, self.node, global_arrays, config.get("server-round"))


def refuse_revealing_runs(msg, ctxt, call_next):
    """An organisation started with share-metrics=false takes part only in org-metrics="private" runs.

    Checked on every message, before any work, so that not even the prepare reply goes out. This is
    the app's own check: it binds an honest coordinator, not one that ships other code."""
    node = NodeConfig.from_flower(ctxt.node_config, ctxt.run_config)
    if not node.share_metrics and RunConfig.from_flower(ctxt.run_config).org_metrics != "private":
        raise ConfigError(
            f"organisation {node.org} does not reveal its per-organisation metrics (node setting "
            "share-metrics=false), and this run would: the coordinator must start it with --run-config "
            "'org-metrics=\"private\"' (which needs aggregation=\"secagg+\")")
    return call_next(msg, ctxt)


def within_max_weight(fit_msg: Message, reply: Message) -> Message:
    """Refuse to send a SecAgg+ fit whose example count exceeds the round's max weight.

    Flower would only log a warning, and the weight total would wrap around the modulus: the
    coordinator would unmask a wrong aggregate (app/secagg.py). The coordinator sets max weight to
    the largest count prepared at the start of the run, so this happens when a node's data grows
    during a run; any count up to it is weighted correctly."""
    if reply.has_error():
        return reply
    max_weight = compat.recorddict_to_fitins(fit_msg.content, keep_input=True).config.get("max-weight")
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    if max_weight is None:
        raise RuntimeError("the coordinator sent this SecAgg+ round without a max-weight: it runs another version "
                           "of this app; the coordinator must rebuild it from this repository")
    if res.num_examples > max_weight:
        org = res.metrics.get("org", "this node")
        raise RuntimeError(
            f"[{org}] has {res.num_examples} training images now, more than this run's SecAgg+ max weight "
            f"{max_weight:g} (the largest count prepared when the run started): images were added during the run. "
            "Sending them would corrupt the secure sum, so this node sits out the rest of this run; the "
            "coordinator's next run (the same output-dir resumes where this one stopped) picks up the new count.")
    return reply


def secagg_when_asked(msg, ctxt, call_next):
    """secaggplus_mod only understands SecAgg+ train messages; plain FedAvg ones pass it by.

    Under org-metrics="private" the client's fit reply is re-encoded before secaggplus_mod masks it:
    the node's figures move into the vector, its weight becomes 1 and its plain metrics shrink to
    PUBLIC_FIT_METRICS, because secaggplus_mod forwards the FitRes' num_examples and metrics to the
    coordinator unmasked (it only clears the arrays)."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    cfg = RunConfig.from_flower(ctxt.run_config)
    if cfg.org_metrics != "private":
        return secaggplus_mod(msg, ctxt, lambda fit_msg, fit_ctxt: within_max_weight(fit_msg, call_next(fit_msg, fit_ctxt)))

    def private_fit(fit_msg: Message, fit_ctxt: Context) -> Message:
        reply = call_next(fit_msg, fit_ctxt)
        if reply.has_error():
            return reply
        res = compat.recorddict_to_fitres(reply.content, keep_input=False)
        vector = private_vector(parameters_to_ndarrays(res.parameters), res.num_examples, res.metrics,
                                clipping_range=adam_update_bound(cfg.learning_rate, cfg.local_steps),
                                max_images=cfg.max_images_per_node, round_timeout=cfg.round_timeout)
        res.parameters = ndarrays_to_parameters(vector)
        res.num_examples = 1  # QuantizationSettings.private: max_weight 1, every node the same weight
        res.metrics = {k: res.metrics[k] for k in PUBLIC_FIT_METRICS if k in res.metrics}
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=fit_msg)

    return secaggplus_mod(msg, ctxt, private_fit)


app = ClientApp(client_fn=lambda context: LoraClient(context).to_client(),
                mods=[refuse_revealing_runs, secagg_when_asked])
