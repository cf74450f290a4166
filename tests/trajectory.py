"""A short training trajectory with the app's own code, and how two of them must agree.

Run as a script (in an image, by tests/test_gpu_image.py) or imported (here). The trajectory is
three local trainings of two Adam steps each, from the same start, each starting its optimizer
afresh as every round does: the losses of steps after the first depend on the updates taken, and the
final LoRA weights are the sum of every update. One step would not do: its loss is the forward pass
on the starting weights, and the first Adam step moves every weight by almost exactly the learning
rate whatever the gradient, so no loss or size of change could tell a wrong update from a right one.

    python trajectory.py RUN_CONFIG_JSON DATA_DIR CACHE_DIR   prints the trajectory as one JSON line
"""

from __future__ import annotations

import json
import sys

import numpy as np

CALLS, STEPS_PER_CALL = 3, 2
# Stated tolerances between two builds of the same torch on the same CPU (the CUDA build run without
# a GPU vs the CPU build): every recorded loss within 1e-4 relative, and the LoRA weights' total
# change within 1e-3 relative (L2 over all weights). A wrong update (skipped, reversed, mis-scaled)
# is off by 50% or more; the first Adam step's sign-like update makes the weights the more
# sensitive figure, hence its looser bound.
LOSS_RTOL, CHANGE_RTOL = 1e-4, 1e-3


def trajectory(run_config: dict, data_dir: str, cache_dir: str) -> dict:
    from app import model
    from app.config import NodeConfig, RunConfig

    cfg = RunConfig.from_flower(run_config)
    node = NodeConfig.from_flower({"data-dir": data_dir, "org": "org-1", "cache-dir": cache_dir})
    data = model.prepare_data(cfg, node)
    net = model.LoraUNet.load(cfg)
    start = {k: a.copy() for k, a in model.lora_state(net.unet).items()}  # on CPU the arrays alias the weights
    heldout = lambda: net.heldout_loss(data, cfg.eval_timesteps, cfg.seed, cfg.batch_size)  # noqa: E731
    losses = [heldout()]
    for call in range(CALLS):
        stats = net.train(data, steps=STEPS_PER_CALL, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                          seed=cfg.seed + call)
        losses += [stats["train_loss"], heldout()]
    change = np.concatenate([(a - start[k]).ravel() for k, a in model.lora_state(net.unet).items()])
    return {"device": str(net.device), "losses": losses, "change": change.astype(float).tolist()}


def disagreements(got: dict, want: dict) -> list[str]:
    """What differs between trajectory `got` and the reference `want` beyond the stated tolerances
    (empty: they agree). A reference that did not train is refused too: it could prove nothing."""
    problems = []
    a, b = np.asarray(got["change"]), np.asarray(want["change"])
    if not np.any(b) or len(set(want["losses"])) < 2:
        problems.append("the reference trajectory did not train: nothing to compare against")
    if len(got["losses"]) != len(want["losses"]) or a.shape != b.shape:
        return problems + [f"different shapes: {len(got['losses'])} vs {len(want['losses'])} losses, "
                           f"{a.shape} vs {b.shape} weights"]
    for i, (x, y) in enumerate(zip(got["losses"], want["losses"])):
        if not abs(x - y) <= LOSS_RTOL * abs(y):
            problems.append(f"loss {i}: {x:.7g} vs {y:.7g} (relative {abs(x - y) / abs(y):.2e} > {LOSS_RTOL:g})")
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    if not rel <= CHANGE_RTOL:
        problems.append(f"LoRA weights' change differs by {rel:.2e} relative (> {CHANGE_RTOL:g})")
    return problems


if __name__ == "__main__":
    print(json.dumps(trajectory(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3])))
