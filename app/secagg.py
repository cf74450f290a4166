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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        # k clients each contribute at most `quantization_range` to every sum (and to the weight
        # factor); the sum must not wrap around the modulus.
        levels = min(_MAX_QUANTIZATION_RANGE, (MODULUS_RANGE - 1) // len(example_counts))
        return cls(
            clipping_range=adam_update_bound(learning_rate, local_steps),
            max_weight=float(max(example_counts)),
            quantization_range=levels,
        )

    @property
    def step(self) -> float:
        """One quantization level: the worst-case rounding error of one client's value."""
        return 2 * self.clipping_range / self.quantization_range
