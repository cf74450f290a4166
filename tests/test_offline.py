"""Tests for the offline tiny model and demo data generators (no hub access)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.offline import TINY_MODEL_RESOLUTION, write_demo_data, write_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd"))


def test_tiny_model_reloads_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert pipe.unet.config.mid_block_type is None
    assert pipe.vae_scale_factor == 2
    image = pipe(
        "a red circle on a white background",
        height=TINY_MODEL_RESOLUTION,
        width=TINY_MODEL_RESOLUTION,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


def test_tokenizer_knows_caption_characters(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a Red circle, 3 times!").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # <|endoftext|> doubles as the unknown token, so the inner ids must all differ from it.
    assert len(ids) > 10 and tokenizer.unk_token_id not in ids[1:-1]


def test_tiny_model_is_deterministic_and_idempotent(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / weights).read_bytes() == (tiny_model_dir / weights).read_bytes()
    before = (again / "model_index.json").stat().st_mtime_ns
    write_tiny_model(again)
    assert (again / "model_index.json").stat().st_mtime_ns == before


def test_demo_data(tmp_path: Path) -> None:
    from PIL import Image

    folders = write_demo_data(tmp_path)
    assert [f.name for f in folders] == ["org-1", "org-2", "org-3"]
    shapes_per_org = []
    for folder in folders:
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        pngs = sorted(p.name for p in folder.glob("*.png"))
        assert len(pngs) == 12
        assert sorted(r["file_name"] for r in records) == pngs
        with Image.open(folder / pngs[0]) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
        shapes_per_org.append({r["text"].split()[3] for r in records})
    assert shapes_per_org == [{"circle"}, {"square"}, {"triangle"}]

    # Same seed, same bytes.
    again = write_demo_data(tmp_path / "again", orgs=1)
    assert (again[0] / "0001.png").read_bytes() == (folders[0] / "0001.png").read_bytes()


def test_demo_data_with_a_count_per_organisation(tmp_path: Path) -> None:
    folders = write_demo_data(tmp_path, orgs=3, images_per_org=[2, 5, 3])
    assert [len(list(f.glob("*.png"))) for f in folders] == [2, 5, 3]
    assert [len((f / "metadata.jsonl").read_text().splitlines()) for f in folders] == [2, 5, 3]
    with pytest.raises(ValueError, match="3 organisations but 2 image counts"):
        write_demo_data(tmp_path / "bad", orgs=3, images_per_org=[2, 5])


def test_demo_data_cli_skips_existing_and_avoids_torch(tmp_path: Path) -> None:
    write_demo_data(tmp_path, orgs=1, images_per_org=2)
    code = (
        "import sys; from app.offline import main; "
        f"main(['demo-data', {str(tmp_path)!r}, '--orgs', '2', '--images', '3']); "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert "skipping" in result.stdout
    assert len(list((tmp_path / "org-1").glob("*.png"))) == 2
    assert len(list((tmp_path / "org-2").glob("*.png"))) == 3
