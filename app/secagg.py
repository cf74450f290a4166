"""SecAgg+ quantization settings derived from the run, not Flower's generic defaults.

Under SecAgg+ each client scales its vector by n_i / max_weight, clips it to +-clipping_range
(silently) and rounds it stochastically onto quantization_range integer levels. Sending raw LoRA
weights with Flower's defaults (C=8, 2**22 levels, max_weight=1000) puts ~1e-4 of noise on every
weight, which is about the size of a whole round's update. We instead:

- send the round's *update* (local - global), whose size we can bound before training: it is
  at most learning_rate x the sum of Adam's per-step bounds (see `adam_update_bound`), so the
  clipping range hugs what is actually sent and nothing is ever clipped;
- set max_weight to the largest real example count, so the biggest client uses the full range;
- use as many levels as the 32-bit modulus allows for the number of nodes being summed.
Clients verify the bound on what they send and fail the round loudly if it is ever exceeded.

When the integer sum is right (Flower 1.41, secaggplus_mod and secaggplus_workflow): each of the k
nodes sends, modulo 2**32, its weight factor round(n/max_weight * Q) and every value quantized onto
[0, Q]; the masks cancel, so the coordinator recovers the true sums only while each stays below the
modulus. Values are clipped, but the float arithmetic (C + C) * (Q / 2C) can land just above Q, so a
value at +C may round up to Q + 1. Hence two conditions, both needed:
- k * (Q + 1) < 2**32, which `levels` keeps;
- every node's n <= max_weight (a larger n only makes Flower log a warning: its weight factor exceeds
  Q and the weight total wraps, e.g. 4 nodes prepared with 12 images and one now at 13 gave an
  aggregate 49x too large). Nodes refuse to send more (client_app.secagg_when_asked) and the
  coordinator checks the unmasked aggregate's range (`check_aggregate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ADAM_BETAS = (0.9, 0.999)
MODULUS_RANGE = 2**32  # Flower's mask modulus; it must stay below 2**32+1 (uint32 masks)
# Flower's stochastic rounding casts to int32, so one client's levels must fit in 2**31.
_MAX_QUANTIZATION_RANGE = 2**30
# Relative headroom over the analytic bound for float32 rounding in the optimizer step.
_ROUNDING_HEADROOM = 1.01


def adam_step_factor(t: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Upper bound on |m_hat_t| / sqrt(v_hat_t) for ANY gradient sequence, at Adam step t >= 1.

    m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2. Cauchy-Schwarz with
    rho = b1^2/b2 gives |m_t| <= (1-b1) sqrt((1-rho^t)/(1-rho)) sqrt(v_t/(1-b2)); the bias
    corrections multiply by sqrt(1-b2^t)/(1-b1^t). Adam's eps only makes the step smaller.
    """
    b1, b2 = betas
    rho = b1 * b1 / b2
    if rho >= 1:
        raise ValueError(f"Adam betas {betas} have b1^2 >= b2: per-step updates are unbounded")
    return (
        (1 - b1) / math.sqrt(1 - b2)
        * math.sqrt((1 - rho**t) / (1 - rho))
        * math.sqrt(1 - b2**t) / (1 - b1**t)
    )


def adam_update_bound(learning_rate: float, steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Largest |local - global| any LoRA weight can move in one round of `steps` Adam steps."""
    return learning_rate * sum(adam_step_factor(t, betas) for t in range(1, steps + 1)) * _ROUNDING_HEADROOM


def levels(num_nodes: int) -> int:
    """Quantization levels for a sum of `num_nodes` vectors: one node's value lands on at most Q + 1
    (see the module docstring), and k * (Q + 1) must stay below the modulus."""
    return min(_MAX_QUANTIZATION_RANGE, (MODULUS_RANGE - 1) // num_nodes - 1)


@dataclass(frozen=True)
class QuantizationSettings:
    clipping_range: float
    max_weight: float
    quantization_range: int
    modulus_range: int = MODULUS_RANGE

    @classmethod
    def for_round(cls, learning_rate: float, local_steps: int, example_counts: list[int]) -> QuantizationSettings:
        if not example_counts or min(example_counts) <= 0:
            raise ValueError(f"every participating node needs training examples, got counts {example_counts}")
        return cls(
            clipping_range=adam_update_bound(learning_rate, local_steps),
            max_weight=float(max(example_counts)),
            quantization_range=levels(len(example_counts)),
        )

    @property
    def step(self) -> float:
        """One quantization level: the worst-case rounding error of one client's value."""
        return 2 * self.clipping_range / self.quantization_range

    @classmethod
    def private(cls, learning_rate: float, local_steps: int, num_nodes: int) -> QuantizationSettings:
        """org-metrics="private": every node joins with weight 1, so no count is needed or sent
        (see `private_vector`)."""
        return cls(
            clipping_range=adam_update_bound(learning_rate, local_steps),
            max_weight=1.0,
            quantization_range=levels(num_nodes),
        )

    def aggregate_bound(self, weights: list[float]) -> float:
        """Largest |element| an honest unmasked aggregate of nodes with these weights can have.

        It is a weighted mean of values within +-C (weights round(w/max_weight * Q)), plus each
        node's rounding of under one level, divided by the weight total; twice that for float slack."""
        q_total = sum(round(w / self.max_weight * self.quantization_range) for w in weights)
        return self.clipping_range + 2 * len(weights) * self.step * self.quantization_range / max(q_total, 1)

    def check_aggregate(self, rnd: int, aggregate: list[np.ndarray], weights: dict[str, float]) -> None:
        """Fail the run if the unmasked aggregate is one no honest round can produce: the integer sum
        wrapped around the modulus, and the result is garbage however plausible it looks."""
        from .admission import RunFailed  # coordinator only: nodes import this module without flwr.server

        bound = self.aggregate_bound(list(weights.values()))
        worst = max((float(np.max(np.abs(a))) for a in aggregate if a.size), default=0.0)
        if math.isfinite(worst) and worst <= bound:
            return
        over = [f"{org} sent {w:g} examples" for org, w in sorted(weights.items()) if w > self.max_weight]
        cause = (f"{', '.join(over)}, more than the round's max weight {self.max_weight:g} (the largest count "
                 "prepared for this run): its data grew during the run" if over else
                 "a node runs other code than this app (other SecAgg+ settings, or a vector outside them)")
        found = f"an element of {worst:.3g}" if math.isfinite(worst) else "values that are not finite"
        raise RunFailed(
            f"round {rnd}: the SecAgg+ aggregate has {found}, outside +-{bound:.3g}, the range any weighted "
            f"mean of clipped updates stays within: the masked sum wrapped around. Likely cause: {cause}. "
            "Nothing of this round was saved; a new run with the same output-dir resumes from the last "
            "checkpoint and prepares every node afresh.")

    def private_errors(self, num_nodes: int, max_images: int, num_examples: int, num_heldout: int) -> dict[str, float]:
        """Worst-case errors of what `private_sums` recovers from `num_nodes` nodes.

        Stochastic rounding moves each node's value by less than one level, 2C/Q, so every sum is off
        by less than k levels; each figure was scaled by C/bound, so its sum is off by < k*(2/Q)*bound.
        """
        level = 2 / self.quantization_range  # one level, relative to the clipping range
        return {
            "images": num_nodes * level * max_images,  # totals are exact integers while this is < 0.5
            "train_loss": num_nodes * level * max_images * LOSS_BOUND / max(num_examples, 1),
            "heldout_loss": num_nodes * level * max_images * LOSS_BOUND / max(num_heldout, 1),
            "update": num_nodes * level * self.clipping_range * max_images / max(num_examples, 1),
        }


# --- org-metrics="private": federation-wide figures inside the masked vector ------------------------
#
# Flower's SecAgg+ reveals one thing: sum_i q_i x_i / sum_i q_i, with q_i = round(n_i/max_weight * Q)
# from each node's plain num_examples n_i. That weight total is dropped after unmasking, so totals
# (images, held-out images) could only be estimated from it. Instead every node sends weight 1
# (max_weight = 1, q_i = Q exactly) and weights its own contributions: the coordinator gets the plain
# mean over the k aggregated nodes, i.e. k x mean = the SUM of what nodes put in, and nothing else.
# Each node appends FIGURES to its update, every value scaled into [0, clipping_range] by a bound it
# checks first (Flower clips silently): with W = max-images-per-node, B = LOSS_BOUND, R = round-timeout,
#   n/W  h/W  s/W  (train loss * n)/(W*B)  (held-out loss * h)/(W*B)  fit seconds/R  [non-finite flags]
# and its update times n/W. The coordinator divides sums: N = sum n exactly, the example-weighted train
# loss sum(T n)/N, the image-weighted held-out loss sum(L h)/H, the example-weighted update.

# Held-out and train losses are noise-prediction MSE against unit-variance noise: predicting zero
# scores 1.0. A loss above 10 means training diverged; a node refuses to send it rather than have it
# clipped into a wrong federated figure. A NaN/Inf loss is sent as a flag, so the federated loss turns
# NaN (and FedloraNonFiniteLoss fires) as it would with shared figures.
LOSS_BOUND = 10.0
FIGURES = ("train_images", "heldout_images", "skipped_images", "train_loss_x_images", "heldout_loss_x_images",
           "fit_seconds", "train_loss_nonfinite", "heldout_loss_nonfinite")


class PrivateBoundError(ValueError):
    """A node's figure is outside the bound that keeps SecAgg+ from clipping it."""


def private_vector(update: list[np.ndarray], num_train: int, report: dict, *, clipping_range: float,
                   max_images: int, round_timeout: float) -> list[np.ndarray]:
    """Node side: [update * n/W ..., FIGURES], every value within [-clipping_range, clipping_range].

    `update` may be empty (the final measurement sends figures only). Refusals name the bound, never
    the node's value: the error message reaches the coordinator.
    """
    org = report.get("org", "this node")
    n, h, s = num_train, int(report["num_heldout"]), int(report["skipped_images"])
    if n + h + s > max_images:
        raise PrivateBoundError(
            f"[{org}] holds more images than the run setting max-images-per-node={max_images} allows; the "
            "coordinator must raise it (org-metrics=\"private\" scales every figure by that bound)")
    losses = {}
    for key, count in (("train_loss", n), ("heldout_loss", h)):
        value = float(report.get(key, 0.0)) if count else 0.0
        if math.isfinite(value) and not 0 <= value <= LOSS_BOUND:
            raise PrivateBoundError(f"[{org}] {key.replace('_', ' ')} is outside [0, {LOSS_BOUND:g}]: training "
                                    "diverged; lower the learning rate (org-metrics=\"private\" cannot send it)")
        losses[key] = (value * count, 0.0) if math.isfinite(value) else (0.0, 1.0)
    seconds = float(report.get("fit_seconds", 0.0))
    if not 0 <= seconds <= round_timeout:
        raise PrivateBoundError(f"[{org}] took longer than round-timeout={round_timeout:g} s; its reply is too late")
    figures = np.array([
        n / max_images, h / max_images, s / max_images,
        losses["train_loss"][0] / (max_images * LOSS_BOUND), losses["heldout_loss"][0] / (max_images * LOSS_BOUND),
        seconds / round_timeout, losses["train_loss"][1], losses["heldout_loss"][1],
    ], dtype=np.float64) * clipping_range
    # |update| <= clipping_range is checked by the node before (adam_update_bound); n/W <= 1 keeps it so.
    return [u.astype(np.float64) * (n / max_images) for u in update] + [figures]


def private_sums(mean: list[np.ndarray], num_nodes: int, *, clipping_range: float, max_images: int,
                 round_timeout: float) -> tuple[list[np.ndarray], dict[str, float | int | None]]:
    """Coordinator side: the example-weighted update and federation-wide figures from the unmasked mean
    of `num_nodes` private vectors."""
    *scaled, fig = mean
    sums = dict(zip(FIGURES, num_nodes * np.asarray(fig, np.float64) / clipping_range))
    images = {key: int(round(sums[key] * max_images)) for key in FIGURES[:3]}
    n, h = images["train_images"], images["heldout_images"]

    def mean_loss(key: str, count: int) -> float | None:
        if sums[f"{key}_nonfinite"] >= 0.5:  # at least one node's loss was NaN or infinite
            return float("nan")
        return float(sums[f"{key}_x_images"] * max_images * LOSS_BOUND / count) if count else None

    update = [a * (num_nodes * max_images / n) for a in scaled] if n else []
    return update, {
        "num_examples": n, "num_heldout": h, "skipped_images": images["skipped_images"],
        "train_loss": mean_loss("train_loss", n), "heldout_loss": mean_loss("heldout_loss", h),
        "fit_seconds_mean": float(sums["fit_seconds"] * round_timeout / num_nodes),
        "nonfinite_losses": int(round(sums["train_loss_nonfinite"] + sums["heldout_loss_nonfinite"])),
    }
