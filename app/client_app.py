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
the same steps (app/training.py: `prepare`, `local_update`, `measure`) with what it holds.

Before any of it, the node's own rules (app/node_guard.py): its SecAgg+ floor and require-secagg,
whatever the run says; and no error leaves the node with a file name or path in it.

Under org-metrics="private" the node's own figures leave it only inside the SecAgg+ vector: the
prepare reply carries no counts, the fit reply is re-encoded by `secagg_when_asked` (app/secagg.py's
`private_vector`) before it is masked, and the final measurement is a fit with "measure-only".
A node started with share-metrics=false refuses every message of a run that would reveal them.
"""

from __future__ import annotations

from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from . import trainer, wire
from .config import ConfigError, NodeConfig, RunConfig
from .node_guard import secagg_floor, without_names
from .secagg import adam_update_bound, private_vector
from .training import local_update, measure, prepare

# What a fit reply may carry in plain under org-metrics="private": the fingerprint of the global
# weights the node loaded (a hash of what the coordinator sent; it says nothing about the data).
PUBLIC_FIT_METRICS = ("received_fingerprint",)


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


# Outermost first: no error leaves with a name in it; the node's own rules come before any work.
MODS = [without_names, refuse_revealing_runs, secagg_floor, secagg_when_asked]
app = ClientApp(client_fn=lambda context: LoraClient(context).to_client(), mods=MODS)
