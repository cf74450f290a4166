"""An organisation's images: discovery, validation, the held-out split.

Accepted layouts (what people already have):
- a Hugging Face `imagefolder`: images plus `metadata.jsonl` lines {"file_name": ..., "text": ...};
- a plain folder of images, all captioned with the node's `default-caption`.

A corrupt, unreadable or too small image is skipped and counted (the round goes on with the
rest); a missing or empty folder, or an image that would be silently damaged (16-bit), stops with a
DataError: its message (what is wrong, counts, the fix) reaches the coordinator; the file and folder
names stay in `detail`, for the organisation's own log. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA = "metadata.jsonl"
# One to train on and one to hold out.
MIN_IMAGES = 2
# 8-bit colour modes convert to RGB losslessly; 16-bit/float modes would be silently clipped.
_CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}
# Why load_image skips a file, for messages that reach the coordinator (the node's log has each file's reason).
SKIP_REASONS = ("corrupt, not an image, over Pillow's pixel limit or under half the training resolution; "
                "the node's log says which")


class DataError(ValueError):
    """The organisation's data cannot be used as given.

    str(): what is wrong, in reasons and counts, and the fix; it reaches the coordinator, so it
    never names a file or folder (medical file names carry patient or accession numbers). `names`:
    which ones, for the organisation's own log (`detail`)."""

    def __init__(self, message: str, names: str = "") -> None:
        super().__init__(message)
        self.names = names

    @property
    def detail(self) -> str:
        return f"{self} [{self.names}]" if self.names else str(self)


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    # The path relative to the data folder: metadata.jsonl may name a/x.png and b/x.png, two images.
    name: str


def discover(data_dir: Path, default_caption: str | None) -> list[Example]:
    """List the captioned images in `data_dir`, in a stable order."""
    if not data_dir.is_dir():
        raise DataError(
            "the data directory does not exist on this node: mount the organisation's images there or fix the "
            "SuperNode's --node-config data-dir", f"data-dir {data_dir}")
    meta = data_dir / METADATA
    if meta.is_file():
        examples = _from_metadata(data_dir, meta)
    else:
        images = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images and not default_caption:
            raise DataError(
                f"the data folder has images but no {METADATA} and the node has no default caption: add "
                f"{METADATA} lines {{\"file_name\": ..., \"text\": ...}} or set --node-config default-caption=\"...\"",
                f"data-dir {data_dir}")
        examples = [Example(p, default_caption or "", p.name) for p in images]
    if len(examples) < MIN_IMAGES:
        raise DataError(
            f"the data folder holds {len(examples)} usable image(s): at least {MIN_IMAGES} are needed (one to train "
            f"on, one held out); supported types are {', '.join(sorted(IMAGE_SUFFIXES))}", f"data-dir {data_dir}")
    return examples


def _from_metadata(data_dir: Path, meta: Path) -> list[Example]:
    examples = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(
                f"{METADATA} line {lineno} is not a JSON object with 'file_name' and 'text' ({type(err).__name__}): "
                "fix or remove that line", f"{meta}:{lineno}: {err}") from None
        path, root = (data_dir / name).resolve(), data_dir.resolve()
        if root not in path.parents:
            raise DataError(f"{METADATA} line {lineno} names a file outside the data folder: use paths relative to "
                            "the folder", f"{meta}:{lineno} names {name!r}")
        if not path.is_file():
            raise DataError(f"{METADATA} line {lineno} names a file that is not in the data folder: add it or remove "
                            "that line", f"{meta}:{lineno} names {name!r}")
        examples.append(Example(path, str(text), path.relative_to(root).as_posix()))
    return sorted(examples, key=lambda e: str(e.path))


def split(examples: list[Example], heldout_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/held-out split: an image is held out when its own hash says so.

    Each image's (seed, name) hash, read as a fraction in [0, 1), is compared with
    `heldout_fraction`, so an image's side never depends on which other images exist: adding or
    removing images never moves a trained-on image into the held-out set (which would make the
    held-out loss a lie). The share held out is therefore close to, not exactly, the fraction.

    Only when the rule leaves a side empty (a folder of a handful of images) does the image nearest
    the threshold cross over, so that there is one image to train on and one to measure. That is
    the one case where other images matter, and the warning says so: as the folder grows, that
    image only ever returns to the side its own hash picks.
    """
    def score(e: Example) -> float:
        digest = hashlib.sha256(f"{seed}:{e.name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    heldout = [e for e in examples if score(e) < heldout_fraction]
    train = [e for e in examples if score(e) >= heldout_fraction]
    crossing = None
    if not heldout:
        crossing = min(train, key=score)
        heldout, train = [crossing], [e for e in train if e is not crossing]
    elif not train:
        crossing = max(heldout, key=score)
        train, heldout = [crossing], [e for e in heldout if e is not crossing]
    if crossing is not None:
        log(WARNING, "by their hashes, all %d images fall on one side of heldout-fraction=%s; %s crosses over "
            "so that one image is trained on and one held out. With this few images the split can change "
            "when images are added or removed: add images for a stable held-out set", len(examples),
            heldout_fraction, crossing.name)
    return train, heldout


def load_image(path: Path, resolution: int) -> np.ndarray | None:
    """Decode, resize (shorter side) and centre-crop to `resolution`; float32 HWC in [-1, 1].

    Returns None for a corrupt, truncated or unreadable file, one over Pillow's pixel limit (a
    decompression bomb), or one under half the resolution: the caller skips and counts it; the log
    says why. Raises DataError for a 16-bit or float image, which converting would silently clip.
    """
    try:
        with warnings.catch_warnings():
            # Past Image.MAX_IMAGE_PIXELS Pillow only warns (it raises past twice that): either way
            # the image could exhaust the node's memory, so it is skipped like a corrupt one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                # Phone photos are stored turned, with an EXIF tag saying how to show them upright.
                # Returns a copy either way: detached from the file before it closes.
                img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        log(WARNING, "skipping %s (%s)", path, err)
        return None
    if img.mode not in _CONVERTIBLE_MODES:
        raise DataError(
            f"an image has mode {img.mode} (16-bit or float): convert it to 8-bit RGB, e.g. with "
            "PIL's Image.open(...).convert('RGB').save(...); the node's log names the file", str(path))
    if min(img.size) < resolution // 2:
        # A thumbnail or icon among an organisation's photos must not keep it out of the federation.
        log(WARNING, "skipping %s (%dx%d, under half the training resolution %d: upscaling that far only teaches "
            "blur; use larger images or a lower run config 'resolution')", path, img.width, img.height, resolution)
        return None
    # Transparent pixels become white rather than whatever colour hides under alpha 0.
    if "A" in img.mode or img.mode == "P" and "transparency" in img.info:
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")
    else:
        rgb = img.convert("RGB")
    scale = resolution / min(rgb.size)
    rgb = rgb.resize((max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale))),
                     Image.Resampling.BICUBIC)
    left, top = (rgb.width - resolution) // 2, (rgb.height - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


def fingerprint(examples: list[Example]) -> str:
    """Changes whenever a file, its size/mtime or its caption changes: the latent cache key."""
    h = hashlib.sha256()
    for e in examples:
        st = e.path.stat()
        h.update(f"{e.path}\0{st.st_size}\0{st.st_mtime_ns}\0{e.caption}\n".encode())
    return h.hexdigest()
