"""Offline stand-ins for the Hugging Face hub: a tiny model and synthetic data.

These exist only for the tests and the offline demo, where no hub is reachable.
Real runs use hub model ids such as ``segmind/tiny-sd`` and real image folders.

    python -m app.offline tiny-model DIR
    python -m app.offline demo-data DIR [--orgs 3] [--images 12]

``tiny-model`` writes a randomly initialised ``StableDiffusionPipeline`` that
loads with ``StableDiffusionPipeline.from_pretrained(DIR, local_files_only=True)``.
Its output is noise; it only has the right structure (BK-SDM-Tiny style UNet
with cross-attention in every block and no mid block, so LoRA targets such as
``to_q``/``to_k``/``to_v``/``to_out.0`` exist). Its VAE has two blocks, so the
VAE scale factor is 2 (not 8): use 32x32 images, giving 16x16 latents.

``demo-data`` writes one ``imagefolder``-style folder per organisation
(``org-1``, ``org-2``, ...): PNG files plus ``metadata.jsonl`` with
``{"file_name": ..., "text": ...}`` lines. Each organisation draws a different
shape, so the federated clients really hold non-identical data.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

#: Resolution the tiny model is meant to run at (VAE scale factor 2 -> 16x16 latents).
TINY_MODEL_RESOLUTION = 32

# CLIP's byte-level BPE prepends no space marker; word ends carry this suffix instead.
_END_OF_WORD = "</w>"
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    # Every byte alone and as a word end, with no merges: any text tokenizes
    # (one token per character) without an unknown token, and the vocab stays tiny.
    chars = _byte_unicode_chars()
    tokens = chars + [c + _END_OF_WORD for c in chars] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    # transformers 5 takes the vocab/merges themselves (vocab_file= is silently
    # ignored). model_max_length must be 77: the pipeline pads prompts to it.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised Stable Diffusion pipeline to ``out_dir``.

    Deterministic for a given ``seed`` (the global torch RNG is left untouched).
    The VAE scale factor is 2, so run it at 32x32 (``TINY_MODEL_RESOLUTION``).
    Does nothing if ``out_dir/model_index.json`` already exists.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        print(f"tiny model already present in {out_dir}")
        return out_dir

    # Imported here so that demo-data (and importing this module) stays light.
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_MODEL_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type=None,  # BK-SDM-Tiny drops the mid block
            cross_attention_dim=32,
            # diffusers uses this as the number of heads: 8 heads of 4 and 8 channels.
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_MODEL_RESOLUTION,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                # The defaults are the real CLIP ids (49406/49407), outside this vocab;
                # the pooled output looks up the EOS position by id.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # SD 1.x training schedule; steps_offset=1 as in the SD 1.x configs (0 triggers
    # a deprecation warning in the pipeline).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    # diffusers writes weights 0600; these random weights are no secret, and the nodes that load
    # them run as their own unprivileged users.
    for path in out_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    unet_params = sum(p.numel() for p in unet.parameters())
    print(f"wrote tiny Stable Diffusion pipeline to {out_dir} (UNet: {unet_params:,} parameters)")
    return out_dir


# (name, RGB) pairs; names go into the captions.
_COLOURS = [
    ("red", (220, 30, 30)),
    ("green", (30, 160, 60)),
    ("blue", (30, 70, 220)),
    ("yellow", (235, 200, 20)),
    ("orange", (245, 130, 20)),
    ("purple", (130, 40, 170)),
    ("pink", (240, 110, 180)),
    ("black", (20, 20, 20)),
]
_SHAPES = ["circle", "square", "triangle"]


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def write_demo_data(
    out_dir: Path, orgs: int = 3, images_per_org: int | list[int] = 12, size: int = 64, seed: int = 0
) -> list[Path]:
    """Write ``orgs`` imagefolder datasets ``out_dir/org-1`` ... and return their paths.

    ``images_per_org``: one count for every organisation, or one per organisation (unequal
    counts are what tests of example-weighted averaging need).

    Organisation ``i`` draws ``_SHAPES[(i - 1) % 3]`` (circles, squares, triangles)
    in varied colours, sizes and positions on a white ``size`` x ``size`` RGB
    background, captioned like "a small red circle on a white background".
    Deterministic for a given ``seed``. Folders that already hold a
    ``metadata.jsonl`` are left alone.
    """
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    counts = [images_per_org] * orgs if isinstance(images_per_org, int) else list(images_per_org)
    if len(counts) != orgs:
        raise ValueError(f"write_demo_data: {orgs} organisations but {len(counts)} image counts {counts}")
    folders = []
    for org, count in zip(range(1, orgs + 1), counts):
        folder = out_dir / f"org-{org}"
        folders.append(folder)
        if (folder / "metadata.jsonl").exists():
            print(f"{folder} already has metadata.jsonl, skipping")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        shape = _SHAPES[(org - 1) % len(_SHAPES)]
        # One stream per organisation, so changing --orgs does not change existing orgs.
        rng = random.Random(f"{seed}:{org}")
        records = []
        for index in range(1, count + 1):
            colour_name, rgb = rng.choice(_COLOURS)
            extent = rng.randint(size // 4, size * 3 // 4)
            left = rng.randint(0, size - extent)
            top = rng.randint(0, size - extent)
            image = Image.new("RGB", (size, size), (255, 255, 255))
            _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + extent - 1, top + extent - 1), rgb)
            file_name = f"{index:04d}.png"
            image.save(folder / file_name)
            size_word = "small" if extent < size // 2 else "large"
            caption = f"a {size_word} {colour_name} {shape} on a white background"
            records.append({"file_name": file_name, "text": caption})
        # Written last, so an interrupted run is redone rather than skipped.
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        print(f"wrote {count} {size}x{size} images of {shape}s to {folder}")
    return folders


def _int_at_least(minimum: int):
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.offline",
        description="Generate a tiny model and demo data for tests and the offline demo (no hub access).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser(
        "tiny-model",
        help="write a tiny randomly initialised StableDiffusionPipeline (run it at 32x32)",
    )
    model.add_argument("dir", type=Path, help="output directory (skipped if it already holds model_index.json)")
    model.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")

    data = commands.add_parser("demo-data", help="write per-organisation synthetic image folders org-1, org-2, ...")
    data.add_argument("dir", type=Path, help="output directory")
    data.add_argument("--orgs", type=_int_at_least(1), default=3, help="number of organisations (default: 3)")
    data.add_argument("--images", type=_int_at_least(1), default=12, help="images per organisation (default: 12)")
    data.add_argument(
        "--size", type=_int_at_least(8), default=64, help="image width and height in pixels (default: 64)"
    )
    data.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    args = parser.parse_args(argv)
    if args.command == "tiny-model":
        write_tiny_model(args.dir, seed=args.seed)
    else:
        write_demo_data(args.dir, orgs=args.orgs, images_per_org=args.images, size=args.size, seed=args.seed)


if __name__ == "__main__":
    main()
