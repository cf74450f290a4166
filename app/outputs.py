"""The run's output directory: per-round checkpoints, resume, the final adapter, sample grids.

    <output-dir>/run-config.json                   settings the checkpoints and losses depend on
    <output-dir>/rounds/round-0003/                one complete round, written atomically:
        pytorch_lora_weights.safetensors           the global adapter after that round
        metrics.json                               losses, participants, timings
        samples.png                                fixed prompts and seeds (if enabled)
    <output-dir>/rounds/round-0000/                the base model: metrics and samples
    <output-dir>/final/pytorch_lora_weights.safetensors   `pipe.load_lora_weights(<output-dir>/final)`
    <output-dir>/metrics.jsonl                     every round's metrics, one line each
    <output-dir>/losses.png                        training and held-out loss by round

A round directory appears by rename only when complete, so a crash never leaves a half round
that a restart would resume from. A run holds an exclusive lock on the directory (run.lock) for
its life, so two runs never write each other's rounds.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
LOCK_FILE = "run.lock"


class OutputDirInUse(RuntimeError):
    """Another run (named in the message) holds the output directory."""


class OutputDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rounds = root / "rounds"
        self.final = root / "final"
        self._lock = None

    def claim(self, identity: dict[str, Any]) -> None:
        """Lock the directory for this run, then record what the checkpoints here depend on, or
        refuse a directory from another setup. The lock lasts until release() or the process ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.rounds.mkdir(exist_ok=True)
        path = self.root / "run-config.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous != identity:
                diff = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
                raise ValueError(
                    f"output-dir {self.root} holds checkpoints of another setup {diff} (was, now): use a "
                    "new output-dir, or the same settings to resume"
                )
        else:
            path.write_text(json.dumps(identity, indent=2) + "\n")

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        # "a+": opening must not erase the holder's line before the lock is ours.
        lock = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "holder unknown"
            lock.close()
            raise OutputDirInUse(
                f"output-dir {self.root} is in use by another run ({holder}): wait for that run to end "
                "(`flwr ls`), or give this one another output-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
        lock.flush()
        self._lock = lock  # the OS releases it when this process ends, however it ends

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def round_dir(self, rnd: int) -> Path:
        return self.rounds / f"round-{rnd:04d}"

    def completed_rounds(self) -> list[int]:
        if not self.rounds.is_dir():
            return []
        found = (re.fullmatch(r"round-(\d+)", p.name) for p in self.rounds.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def last_checkpoint(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest round with an adapter, as (round, PEFT-named arrays)."""
        for rnd in reversed(self.completed_rounds()):
            if (self.round_dir(rnd) / ADAPTER_FILE).is_file():
                return rnd, read_adapter(self.round_dir(rnd))
        return None

    def write_round(self, rnd: int, metrics: dict[str, Any], adapter: dict[str, np.ndarray] | None,
                    samples: Any | None) -> Path:
        final = self.round_dir(rnd)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if adapter is not None:
            write_adapter(tmp, adapter)
        if samples is not None:
            samples.save(tmp / "samples.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self._write_history()
        return final

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        return json.loads((self.round_dir(rnd) / "metrics.json").read_text())

    def update_round_metrics(self, rnd: int, updates: dict[str, Any]) -> None:
        """Add what is learnt about a round later (its adapter's held-out loss)."""
        path = self.round_dir(rnd) / "metrics.json"
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.round_metrics(rnd) | updates, indent=2) + "\n")
        tmp.replace(path)
        self._write_history()

    def _write_history(self) -> None:
        lines = [json.dumps(json.loads((self.round_dir(r) / "metrics.json").read_text()))
                 for r in self.completed_rounds()]
        tmp = self.root / "metrics.jsonl.partial"
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.root / "metrics.jsonl")
        plot = loss_plot([json.loads(line) for line in lines])
        plot.save(self.root / "losses.partial.png")
        (self.root / "losses.partial.png").replace(self.root / "losses.png")

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def write_final(self, rnd: int) -> Path:
        tmp = self.final.with_name("final.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.round_dir(rnd), tmp)
        shutil.rmtree(self.final, ignore_errors=True)
        tmp.rename(self.final)
        return self.final / ADAPTER_FILE


def write_adapter(directory: Path, peft_state: dict[str, np.ndarray]) -> Path:
    """Save in the layout `StableDiffusionPipeline.load_lora_weights(directory)` reads."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in peft_state.items()}
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(tensors))
    return directory / ADAPTER_FILE


def read_adapter(directory: Path) -> dict[str, np.ndarray]:
    """The inverse of write_adapter: PEFT names, sorted."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.numpy import load_file

    raw = load_file(directory / ADAPTER_FILE)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in raw.items()})
    return {k: peft[k] for k in sorted(peft)}


HELDOUT_COLOR, HELDOUT_OTHER_COLOR, TRAIN_COLOR = (200, 60, 40), (230, 150, 0), (40, 90, 200)


def heldout_by_coverage(history: list[dict[str, Any]]) -> tuple[list[str] | None, list[dict], list[dict]]:
    """Split the held-out figures by the organisations they cover: (round 0's organisations, figures
    over exactly those, figures over others). A held-out loss is a mean over the organisations that
    measured it, so only figures over the same organisations are comparable. Histories written
    before `heldout_orgs` was recorded have None, and compare with each other."""
    measured = [m for m in history if m.get("heldout_loss") is not None]
    if not measured:
        return None, [], []
    reference = measured[0].get("heldout_orgs")
    like = [m for m in measured if m.get("heldout_orgs") == reference]
    return reference, like, [m for m in measured if m.get("heldout_orgs") != reference]


def heldout_summary(history: list[dict[str, Any]]) -> str:
    """The ServerApp's "held-out loss by round", comparable figures first, e.g.
    `0: 1.00000, 1: 0.90000 (org-1, org-2); not comparable, other organisations: 2: 0.40000 (org-1)`."""
    def orgs(m_orgs: list[str] | None) -> str:
        return f" ({', '.join(m_orgs)})" if m_orgs else ""

    reference, like, unlike = heldout_by_coverage(history)
    text = ", ".join(f"{m['round']}: {m['heldout_loss']:.5f}" for m in like) + orgs(reference)
    if unlike:
        text += "; not comparable, other organisations: " + ", ".join(
            f"{m['round']}: {m['heldout_loss']:.5f}{orgs(m.get('heldout_orgs'))}" for m in unlike)
    return text


def loss_plot(history: list[dict[str, Any]], size: tuple[int, int] = (720, 420)):
    """Training and held-out loss by round, for people who would rather look than read.

    Held-out figures over other organisations than round 0's are orange dots off the line: they are
    means over other data (`heldout_by_coverage`). Drawn with PIL (already a dependency) rather than
    pulling a plotting library into every image.
    """
    from PIL import Image, ImageDraw

    _, like, unlike = heldout_by_coverage(history)
    series = {"held-out": ([(m["round"], m["heldout_loss"]) for m in like], HELDOUT_COLOR),
              "train": ([(m["round"], m["train_loss"]) for m in history if m.get("train_loss") is not None],
                        TRAIN_COLOR)}
    if unlike:
        series["held-out, other orgs"] = ([(m["round"], m["heldout_loss"]) for m in unlike], HELDOUT_OTHER_COLOR)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    points = [p for pts, _ in series.values() for p in pts]
    draw.text((left, 8), "loss by round", fill=(0, 0, 0))
    if not points:
        return img
    x_max = max(1, max(x for x, _ in points))
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    pad = (y_max - y_min) * 0.1 or abs(y_max) * 0.01 or 1.0
    y_min, y_max = y_min - pad, y_max + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_max, bottom - (bottom - top) * (y - y_min) / (y_max - y_min))

    for i in range(5):  # y ticks
        y = y_min + (y_max - y_min) * i / 4
        _, py = to_px(0, y)
        draw.line((left - 4, py, left, py), fill=(0, 0, 0))
        draw.text((5, py - 6), f"{y:.4g}", fill=(0, 0, 0))
    for x in range(0, x_max + 1, max(1, x_max // 10)):  # round ticks
        px, _ = to_px(x, y_min)
        draw.line((px, bottom, px, bottom + 4), fill=(0, 0, 0))
        draw.text((px - 4, bottom + 8), str(x), fill=(0, 0, 0))
    for i, (name, (pts, color)) in enumerate(series.items()):
        px = [to_px(x, y) for x, y in pts]
        if len(px) > 1 and color != HELDOUT_OTHER_COLOR:  # no line through incomparable points
            draw.line(px, fill=color, width=2)
        for cx, cy in px:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=color)
        draw.text((right - 160, top + 8 + 14 * i), f"-- {name}", fill=color)
    return img
