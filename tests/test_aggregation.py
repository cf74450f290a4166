"""SecAgg+'s integer sum never wraps, and when it could, a node or the coordinator says so.

Flower's SecAgg+ (1.41) sums k nodes' integers modulo 2**32: each node sends its weight factor
round(n/max_weight * Q) and every value quantized onto [0, Q] (Q+1 where float rounding puts +C just
above Q). The unmasked sum is right only while it stays below the modulus. These tests run Flower's
real protocol in process (its workflow, its secaggplus_mod, real masks) with the app's own mods.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.quantization import quantize

from app.admission import RunFailed
from app.secagg import LOSS_BOUND, QuantizationSettings, adam_update_bound
from test_private_metrics import _nodes, _run_secagg, _server_identity  # noqa: F401 (autouse fixture)
from test_secagg import _updates

LR, STEPS = 1e-4, 50


def _weights(nodes, updates):
    n = [x["n"] for x in nodes]
    return [sum(ni * u[i].astype(np.float64) for u, ni in zip(updates, n)) / sum(n) for i in range(len(updates[0]))]


def _max_error(got, want) -> float:
    return max(float(np.max(np.abs(g.astype(np.float64) - w))) for g, w in zip(got, want))


def _grown_round(mods=None):
    """4 organisations prepared with 12 training images each; one has 13 when it trains."""
    nodes = _nodes(4, seed=3)
    for x in nodes:
        x["n"] = 12
    nodes[2]["n"] = 13
    updates = _updates(4, LR, STEPS, seed=3)
    strategy, replies = _run_secagg({"learning-rate": LR, "local-steps": STEPS}, nodes, updates,
                                    prepared=[12, 12, 12, 12], mods=mods)
    return nodes, updates, strategy, replies


def test_a_node_whose_data_grew_refuses_and_the_round_aggregates_the_others():
    """Without the refusal this round's aggregate came out ~50x too large, silently (Flower only logs
    a warning): 13 > max_weight=12 makes the weight factors' sum wrap around 2**32."""
    nodes, updates, strategy, replies = _grown_round()
    errors = [r.error.reason for r in replies if r.has_error()]
    assert len(errors) == 1, errors
    assert "13 training images" in errors[0] and "max weight 12" in errors[0] and "next run" in errors[0], errors[0]
    assert strategy.fit is not None and strategy.fit["orgs"] == ["org-101", "org-102", "org-104"]
    assert strategy.fit["heldout"]["heldout_orgs"] == ["org-101", "org-102", "org-104"]  # what the loss covers
    others = [i for i in range(4) if i != 2]
    want = _weights([nodes[i] for i in others], [updates[i] for i in others])
    err = _max_error(strategy.global_arrays, want)
    assert err < 1e-7, f"aggregate off by {err:.2e} (update scale {max(np.max(np.abs(w)) for w in want):.2e})"


def test_the_coordinator_drops_a_node_that_declares_more_than_the_max_weight():
    """A node without the app's check (only Flower's secaggplus_mod) sends 13 > max_weight=12. Its
    masked weight factor would make the sum wrap; the coordinator reads the count it declared in plain,
    drops it before its vector is summed (its masks are reconstructed as a dropped node's) and names it."""
    nodes, updates, strategy, replies = _grown_round(mods=[secaggplus_mod])
    assert list(strategy.misbehaved) == ["org-103"] and "declared 13 training examples" in strategy.misbehaved["org-103"]
    assert strategy.fit is not None and strategy.fit["orgs"] == ["org-101", "org-102", "org-104"]
    others = [i for i in range(4) if i != 2]
    want = _weights([nodes[i] for i in others], [updates[i] for i in others])
    assert _max_error(strategy.global_arrays, want) < 1e-7


def _declares(count: int):
    """A mod around Flower's secaggplus_mod that masks with the node's real count, then declares `count`
    in plain: the coordinator's per-reply check cannot see the difference."""
    from flwr.app import MetricRecord

    def mod(msg, ctxt, call_next):
        reply = secaggplus_mod(msg, ctxt, call_next)
        if "fitres.num_examples" in reply.content.metric_records:
            reply.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": count})
        return reply
    return mod


def test_the_coordinator_fails_the_round_when_the_aggregate_is_impossible():
    """A node masks 13 > max_weight=12 but declares 12: its weight factor makes the integer sum wrap.
    The unmasked aggregate lies far outside what any weighted mean of clipped updates can be, and its
    weight total differs from what the nodes declared: the round fails, naming the candidates."""
    with pytest.raises(RunFailed, match=r"round 1: the SecAgg\+ weight factors sum to .* one of \['org-101', 'org-102', "
                                        r"'org-103', 'org-104'\] masked a weight other than the one it reported"):
        _grown_round(mods=[_declares(12)])


def test_an_honest_aggregate_passes_the_range_check():
    counts = {"a": 12, "b": 30, "c": 5}
    q = QuantizationSettings.for_round(LR, STEPS, list(counts.values()))
    assert q.aggregate_bound(list(counts.values())) < q.clipping_range * (1 + 1e-6)
    q.check_aggregate(1, [np.full(4, q.clipping_range), np.full(2, -q.clipping_range)], counts)
    with pytest.raises(RunFailed, match=r"round 7: .* element of 0.00636, outside \+-0.00635.* other code than this app"):
        q.check_aggregate(7, [np.full(4, q.clipping_range * 1.001)], counts)
    with pytest.raises(RunFailed, match="not finite"):
        q.check_aggregate(7, [np.array([np.nan])], counts)


# --- the worst case: every node at max_weight, every value at +-C, every rounding upward -----------

def _worst_rounding(monkeypatch):
    """Flower's stochastic rounding takes ceil(x) and steps down with probability ceil(x) - x; a
    uniform draw just below 1 never steps down, so every value lands on its highest possible level."""
    monkeypatch.setattr(np.random, "rand", lambda *shape: np.full(shape, np.nextafter(1.0, 0.0)))


def _clipping_range_at_the_edge(k: int, private: bool) -> float:
    """A learning rate whose clipping range C makes Flower's float arithmetic put +C one level above
    Q: (C + C) * (Q / 2C) rounds up past Q (about 1 in 12 values of C do, unless Q is a power of 2,
    as it is for k <= 3: then fl(fl(1/x) * x) <= 1 and +C lands on Q exactly)."""
    for lr in np.geomspace(1e-5, 1e-3, 400):
        q = (QuantizationSettings.private(float(lr), STEPS, k) if private
             else QuantizationSettings.for_round(float(lr), STEPS, [1] * k))
        if quantize([np.array([q.clipping_range])], q.clipping_range, q.quantization_range)[0][0] > q.quantization_range:
            return float(lr)
    assert q.quantization_range & (q.quantization_range - 1) == 0, f"no clipping range at the edge found for k={k}"
    return LR


def _extreme_update(c: float) -> list[np.ndarray]:
    return [np.where(np.arange(24).reshape(4, 6) % 2 == 0, c, -c).astype(np.float64), np.full(3, c)]


@pytest.mark.parametrize("k", [3, 4, 5, 17])
def test_worst_case_shared_sum_does_not_wrap(k, monkeypatch):
    _worst_rounding(monkeypatch)
    lr = _clipping_range_at_the_edge(k, private=False)
    c = adam_update_bound(lr, STEPS)
    nodes = _nodes(k, seed=k)
    for x in nodes:
        x["n"] = 12  # every node at max_weight: weight factor Q each
    update = _extreme_update(c)
    strategy, replies = _run_secagg({"learning-rate": lr, "local-steps": STEPS}, nodes, [update] * k)
    assert not [r.error.reason for r in replies if r.has_error()]
    q = strategy.quant
    err = _max_error(strategy.global_arrays, update)  # the mean of k equal updates is that update
    assert err <= k * q.step + 1e-7 * c, (err, q.step)
    assert k * (q.quantization_range + 1) < q.modulus_range  # the condition that makes it so


@pytest.mark.parametrize("k", [3, 4, 5, 17])
def test_worst_case_private_sum_does_not_wrap(k, monkeypatch):
    """org-metrics="private": weight 1 each (= max_weight), figures and update at their bounds."""
    _worst_rounding(monkeypatch)
    lr = _clipping_range_at_the_edge(k, private=True)
    c = adam_update_bound(lr, STEPS)
    w, timeout = 10_000, 1800.0
    nodes = _nodes(k, seed=k)
    for x in nodes:
        x["n"] = w  # n/W = 1: the update travels unscaled, at +-C
        x["report"] |= {"num_heldout": 0, "skipped_images": 0, "train_loss": LOSS_BOUND, "fit_seconds": timeout}
    update = _extreme_update(c)
    strategy, replies = _run_secagg({"org-metrics": "private", "learning-rate": lr, "local-steps": STEPS,
                                     "max-images-per-node": w, "round-timeout": timeout}, nodes, [update] * k)
    assert not [r.error.reason for r in replies if r.has_error()]
    fed = strategy.fit["federated"]
    assert fed["num_examples"] == k * w and fed["num_heldout"] == 0
    assert abs(fed["train_loss"] - LOSS_BOUND) < 1e-4 and abs(fed["fit_seconds_mean"] - timeout) < 1e-2
    err = _max_error(strategy.global_arrays, update)
    assert err <= k * strategy.quant.step + 1e-7 * c, (err, strategy.quant.step)
