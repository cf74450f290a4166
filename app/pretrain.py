"""An offline pretrained base: the tiny pipeline of app/offline.py, trained centrally on real images.

    python -m app.pretrain models/digits-sd            (what `make pretrain` runs; 127 s on the quiet 2-core machine)

The images are scikit-learn's bundled handwritten digits (`load_digits`: 1,797 8x8 scans, no
download), upscaled to 16 px (RESOLUTION), dark ink on white, captioned "a handwritten digit N". The base
learns only PRETRAIN_CLASSES (0-4); the organisations get the other digits (ORG_CLASSES) through
`python -m app.partition sklearn-digits` (DIGITS_SOURCE), so LoRA fine-tuning has something to
learn that the base does not know. A fifth of the pretraining classes' images (by a per-image hash)
is never trained on: `base_test_images` measures the base on them.

The recipe, all seeded: the random tiny pipeline (app/offline.py, seed 0); the VAE is random there,
so it first learns to reconstruct the digits (VAE_STEPS), then its latents' scale is set so that
they have unit variance (what `scaling_factor` is for); then the whole UNet trains on noise
prediction (UNET_STEPS) with the frozen random text encoder's embeddings of the captions. The
text encoder stays random: its embeddings of "digit 0" ... "digit 9" differ, which is all the UNet
needs to tell them apart. Host-side only (pyproject's fab-exclude): nodes never pretrain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from app.offline import write_tiny_model

SEED = 0
# The scans are 8x8: 16 px loses nothing and costs a quarter of the tiny model's 32 px per step
# (8x8 latents through its VAE's factor 2).
RESOLUTION = 16
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
ORG_CLASSES = (5, 6, 7, 8, 9)
CAPTION = "a handwritten digit {label}"
DIGITS_SOURCE = "sklearn-digits"
BASE_TEST_FRACTION = 0.2
# 127 s together on the quiet 2-core development machine (docs/performance.md).
VAE_STEPS, UNET_STEPS, BATCH, LEARNING_RATE = 300, 1000, 16, 2e-3
# The KL weight keeps the latents near a unit Gaussian without blurring the reconstructions.
KL_WEIGHT = 1e-4


def digit_images(classes=tuple(range(10))) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images N x 16 x 16 x 3, labels, indices into load_digits) of the given classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(np.isin(digits.target, classes))
    images = []
    for scan in digits.images[keep]:
        ink = Image.fromarray((255 - scan * 255 / 16).astype(np.uint8))  # 0..16 ink -> dark on white
        images.append(np.asarray(ink.resize((RESOLUTION,) * 2, Image.Resampling.BICUBIC).convert("RGB")))
    return np.stack(images), digits.target[keep], keep


def _is_base_test(index: int) -> bool:
    digest = hashlib.sha256(f"{SEED}:digit-{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < BASE_TEST_FRACTION


def pretrain_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((images, labels) to pretrain on, (images, labels) of the same classes never trained on)."""
    images, labels, index = digit_images(PRETRAIN_CLASSES)
    test = np.array([_is_base_test(int(i)) for i in index])
    return (images[~test], labels[~test]), (images[test], labels[test])


def digits_dataset():
    """The organisations' digits (ORG_CLASSES) as a datasets.Dataset: `image`, `label` (ClassLabel
    named "0" ... "9"), for app/partition.py."""
    import datasets
    from PIL import Image

    images, labels, _ = digit_images(ORG_CLASSES)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(x) for x in images], "label": labels.tolist()},
                                      features=features)


def _pixels(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batches(n: int, steps: int, gen):
    import torch

    for _ in range(steps):
        yield torch.randint(0, n, (BATCH,), generator=gen)


def _progress(what: str, losses: list[float]) -> None:
    if len(losses) % 100 == 0:
        print(f"  {what} step {len(losses)}: loss {np.mean(losses[-50:]):.4f}", flush=True)


def train_vae(vae, pixels, steps: int, gen) -> float:
    """Reconstruction + a little KL; returns the mean loss of the last 50 steps."""
    import torch

    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE)
    losses = []
    for idx in _batches(len(pixels), steps, gen):
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        _progress("VAE", losses)
    vae.eval()
    return float(np.mean(losses[-50:]))


def train_unet(unet, scheduler, latents, embeds, steps: int, gen) -> float:
    """Noise prediction, as LoraUNet.train does it, on every UNet weight; the mean of the last 50 steps."""
    import torch

    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=LEARNING_RATE)
    losses = []
    for idx in _batches(len(latents), steps, gen):
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        pred = unet(scheduler.add_noise(latents[idx], noise, t), t, embeds[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        _progress("UNet", losses)
    unet.eval()
    return float(np.mean(losses[-50:]))


def pretrain(out_dir: Path, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS) -> dict:
    """Write the pretrained pipeline to `out_dir` (replacing it) and return the recipe's figures,
    also written to `out_dir/pretrain.json`."""
    import torch
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_tiny_model(staging / "random", seed=SEED)
    pipe = StableDiffusionPipeline.from_pretrained(staging / "random", safety_checker=None, requires_safety_checker=False)
    (train_images, train_labels), _ = pretrain_split()
    pixels = _pixels(train_images)
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae_loss = train_vae(pipe.vae, pixels, vae_steps, gen)
        t_vae = time.perf_counter() - t0
        with torch.no_grad():
            raw = pipe.vae.encode(pixels).latent_dist.mean
            pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()))
            latents = raw * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([CAPTION.format(label=d) for d in range(10)], padding="max_length",
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            embeds = pipe.text_encoder(ids)[0][torch.from_numpy(train_labels)]
        unet_loss = train_unet(pipe.unet, pipe.scheduler, latents, embeds, unet_steps, gen)
    # The pipeline's default height and width: RESOLUTION.
    pipe.unet.register_to_config(sample_size=RESOLUTION // 2)
    pipe.vae.register_to_config(sample_size=RESOLUTION)
    pipe.save_pretrained(staging / "model", safe_serialization=True)
    figures = {"seed": SEED, "classes": list(PRETRAIN_CLASSES), "images": len(train_images), "batch": BATCH,
               "learning_rate": LEARNING_RATE, "vae_steps": vae_steps, "vae_loss": vae_loss,
               "unet_steps": unet_steps, "unet_loss": unet_loss, "scaling_factor": pipe.vae.config.scaling_factor,
               "seconds_vae": t_vae, "seconds": time.perf_counter() - t0}
    (staging / "model" / "pretrain.json").write_text(json.dumps(figures, indent=2) + "\n")
    for path in (staging / "model").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # as app/offline.py: nodes read it as other users
    shutil.rmtree(out_dir, ignore_errors=True)
    (staging / "model").rename(out_dir)
    shutil.rmtree(staging)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="where the pipeline goes (replaced)")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    f = pretrain(args.dir, args.vae_steps, args.unet_steps)
    print(f"pretrained {args.dir} on digits {f['classes']} ({f['images']} images, batch {f['batch']}): VAE "
          f"{f['vae_steps']} steps, loss {f['vae_loss']:.4f} ({f['seconds_vae']:.0f} s); UNet {f['unet_steps']} "
          f"steps, loss {f['unet_loss']:.4f}; {f['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
