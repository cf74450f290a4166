"""Loading an organisation's images: the layouts people have, and every way they go wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import NodeConfig, RunConfig
from app.data import DataError, discover, load_image, split
from conftest import tiny_run_config, with_defaults


def _image(path: Path, size=(48, 40), mode="RGB", color=(200, 30, 30)) -> Path:
    Image.new(mode, size, color if mode != "I;16" else 1000).save(path)
    return path


def _imagefolder(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        _image(root / f"img{i}.png", color=(i * 40, 10, 10))
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_imagefolder_with_metadata(tmp_path):
    examples = discover(_imagefolder(tmp_path / "d"), default_caption=None)
    assert [e.name for e in examples] == [f"img{i}.png" for i in range(6)]
    assert examples[3].caption == "picture number 3"


def test_plain_folder_uses_default_caption(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    examples = discover(tmp_path, default_caption="a scan")
    assert [e.caption for e in examples] == ["a scan"] * 3


def local_only(raised, *names) -> None:
    """What reaches the coordinator (str) names no file or folder; the organisation's log (detail) does."""
    for name in names:
        assert str(name) not in str(raised.value), raised.value
        assert str(name) in raised.value.detail, raised.value.detail


def test_plain_folder_without_caption_says_how_to_fix(tmp_path):
    _image(tmp_path / "a.png"), _image(tmp_path / "b.png")
    with pytest.raises(DataError, match="default-caption"):
        discover(tmp_path, default_caption=None)


def test_missing_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data-dir") as raised:
        discover(tmp_path / "nope", None)
    local_only(raised, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="0 usable image") as raised:
        discover(tmp_path / "empty", "caption")
    local_only(raised, tmp_path / "empty")


def test_bad_metadata_names_the_line(tmp_path):
    root = _imagefolder(tmp_path / "d", 2)
    with (root / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "img0.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 3 is not a JSON object") as raised:
        discover(root, None)
    local_only(raised, root)
    (root / "metadata.jsonl").write_text('{"file_name": "patient-4711.png", "text": "x"}\n')
    with pytest.raises(DataError, match="line 1 names a file that is not in the data folder") as raised:
        discover(root, None)
    local_only(raised, "patient-4711.png")
    (root / "metadata.jsonl").write_text('{"file_name": "../patient-4711.png", "text": "x"}\n')
    with pytest.raises(DataError, match="line 1 names a file outside the data folder") as raised:
        discover(root, None)
    local_only(raised, "patient-4711.png")


def test_corrupt_image_is_skipped_not_fatal(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert load_image(tmp_path / "broken.png", 32) is None


def test_16_bit_image_names_the_file_locally(tmp_path):
    with pytest.raises(DataError, match=r"mode I;16") as raised:
        load_image(_image(tmp_path / "deep.png", mode="I;16"), 32)
    local_only(raised, tmp_path / "deep.png")


@pytest.mark.parametrize("size", [(1, 1), (10, 10), (15, 200)])
def test_too_small_image_is_skipped_not_fatal(tmp_path, caplog, size):
    import logging

    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert load_image(_image(tmp_path / "tiny.png", size=size), 32) is None
    assert f"tiny.png ({size[0]}x{size[1]}, under half the training resolution 32" in caplog.text
    assert load_image(_image(tmp_path / "half.png", size=(16, 16)), 32).shape == (32, 32, 3)  # half is enough


def test_a_folder_without_a_usable_image_names_the_folder_and_its_files_locally(tmp_path, tiny_model):
    from app import model

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"garbage")
    _image(tmp_path / "d" / "b.png", size=(1, 1))
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    with pytest.raises(DataError, match=r"none of the 2 image files in the data folder is usable "
                                        r"\(corrupt, .*under half the training resolution") as raised:
        model.prepare_data(cfg, NodeConfig(tmp_path / "d", "org-x", "a photo", tmp_path / "cache"))
    local_only(raised, tmp_path / "d", "a.png", "b.png")
    _image(tmp_path / "d" / "c.png")
    with pytest.raises(DataError, match=r"only 1 of 3 image files is usable, at least 2 are needed; 2 skipped") as raised:
        model.prepare_data(cfg, NodeConfig(tmp_path / "d", "org-x", "a photo", tmp_path / "cache"))
    local_only(raised, tmp_path / "d", "a.png", "b.png")


def test_resize_crop_and_transparency(tmp_path):
    img = Image.new("RGBA", (80, 40), (255, 0, 0, 0))  # fully transparent red
    img.save(tmp_path / "t.png")
    pixels = load_image(tmp_path / "t.png", 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32
    assert np.allclose(pixels, 1.0)  # transparent becomes white, not red


def _sides(root: Path, fraction: float = 0.1, seed: int = 0) -> dict[str, str]:
    train, held = split(discover(root, "a photo"), fraction, seed)
    assert not {e.name for e in train} & {e.name for e in held}
    return {e.name: "train" for e in train} | {e.name: "held-out" for e in held}


def test_split_is_deterministic_and_near_the_fraction(tmp_path):
    for i in range(200):
        (tmp_path / f"img{i:03d}.png").touch()  # split() only needs names
    sides = _sides(tmp_path)
    assert _sides(tmp_path) == sides
    assert 10 <= list(sides.values()).count("held-out") <= 30  # ~10% of 200
    assert _sides(tmp_path, seed=1) != sides  # the seed picks another split


def test_adding_or_removing_images_moves_no_image_between_train_and_heldout(tmp_path):
    # An image trained on that later lands in the held-out set makes the held-out loss a lie.
    for i in range(200):
        (tmp_path / f"img{i:03d}.png").touch()
    before = _sides(tmp_path)
    for i in range(200, 220):
        (tmp_path / f"img{i:03d}.png").touch()
    grown = _sides(tmp_path)
    assert {n: grown[n] for n in before} == before
    for i in range(0, 220, 3):
        (tmp_path / f"img{i:03d}.png").unlink()
    shrunk = _sides(tmp_path)
    assert shrunk == {n: grown[n] for n in shrunk}


def test_tiny_folders_still_get_one_heldout_and_one_training_image(tmp_path):
    for i in range(2):
        (tmp_path / f"img{i}.png").touch()
    for fraction in (0.01, 0.5, 0.99):
        assert sorted(_sides(tmp_path, fraction).values()) == ["held-out", "train"]


def test_prepare_counts_corrupt_images_and_caches_latents(tmp_path, tiny_model, monkeypatch):
    from app import model

    root = _imagefolder(tmp_path / "d", 8)
    (root / "img7.png").write_bytes(b"garbage")
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    node = NodeConfig(root, "org-x", None, tmp_path / "cache")
    data = model.prepare_data(cfg, node)
    assert data.skipped == ["img7.png"]
    assert data.num_train + data.num_heldout == 7
    assert data.train_latents.shape[1:] == (4, 16, 16)

    # The second time nothing is decoded or encoded: the VAE is not even loaded.
    monkeypatch.setattr(model, "_encode", lambda *a: pytest.fail("re-encoded despite the cache"))
    again = model.prepare_data(cfg, node)
    assert np.array_equal(again.train_latents.numpy(), data.train_latents.numpy())

    # A changed file invalidates the cache.
    shutil.copy(root / "img0.png", root / "img1.png")
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        model.prepare_data(cfg, node)



def test_first_encoding_logs_its_progress(tmp_path, tiny_model, monkeypatch, caplog):
    """A node's own log says how far a long first encoding is (the coordinator only sees no answer)."""
    import logging

    from app import model

    monkeypatch.setattr(model, "PROGRESS_SECONDS", 0.0)  # report after every batch
    monkeypatch.setattr(model, "ENCODE_BATCH", 1)
    root = _imagefolder(tmp_path / "d", 4)
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    with caplog.at_level(logging.INFO, logger="flwr"):
        model.prepare_data(cfg, NodeConfig(root, "org-x", None, tmp_path / "cache"))
    text = caplog.text
    assert "[org-x] encoding 4 images once" in text
    assert all(f"encoded {i}/4 images" in text for i in (1, 2, 3)) and "s left)" in text, text


def test_images_encoded_in_batches_get_what_one_at_a_time_gets(tmp_path, tiny_model, monkeypatch):
    from app import model
    from app.data import discover

    root = _imagefolder(tmp_path / "d", 7)
    (root / "img4.png").write_bytes(b"garbage")  # a gap inside a batch
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    examples = discover(root, None)
    monkeypatch.setattr(model, "ENCODE_BATCH", 1)
    one = model._encode(cfg, examples, root)
    monkeypatch.setattr(model, "ENCODE_BATCH", 3)
    batched = model._encode(cfg, examples, root)
    assert batched["names"] == one["names"] == [f"img{i}.png" for i in (0, 1, 2, 3, 5, 6)]
    assert batched["skipped"] == one["skipped"] == ["img4.png"]
    for field in ("latents", "embeds"):
        assert len({row.numpy().tobytes() for row in one[field]}) == 6  # six different images and captions
        np.testing.assert_allclose(batched[field].numpy(), one[field].numpy(), rtol=1e-5, atol=1e-6, err_msg=field)


def test_same_file_name_in_two_subfolders_is_two_images(tmp_path, tiny_model):
    from app import model

    root = tmp_path / "d"
    for sub, color in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0))):
        (root / sub).mkdir(parents=True)
        _image(root / sub / "x.png", color=color)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{sub}/x.png", "text": text}) + "\n" for sub, text in
                                                 (("a", "a red square"), ("b", "a blue circle"), ("c", "a green field"))))
    assert [e.name for e in discover(root, None)] == ["a/x.png", "b/x.png", "c/x.png"]

    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    data = model.prepare_data(cfg, NodeConfig(root, "org-x", None, tmp_path / "cache"))
    latents = np.concatenate([data.train_latents.numpy(), data.heldout_latents.numpy()])
    embeds = np.concatenate([data.train_embeds.numpy(), data.heldout_embeds.numpy()])
    assert len(latents) == 3
    # Three different images with three different captions, not one of them three times.
    assert len({row.tobytes() for row in latents}) == 3 and len({row.tobytes() for row in embeds}) == 3


def test_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    upright = Image.new("RGB", (32, 64), (255, 0, 0))  # portrait: red top half, blue bottom half
    upright.paste((0, 0, 255), (0, 32, 32, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera stored it turned; viewers rotate it 90° clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pixels = load_image(tmp_path / "phone.jpg", 32)
    top, bottom = pixels[:12].mean(axis=(0, 1)), pixels[-12:].mean(axis=(0, 1))
    assert top[0] > 0.8 and top[2] < -0.8  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8  # blue


def test_truncated_image_is_skipped_not_fatal(tmp_path):
    Image.effect_noise((64, 64), 64).convert("RGB").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    assert load_image(tmp_path / "cut.jpg", 32) is None


@pytest.mark.parametrize("pixels_over_limit", [1.5, 3])  # past the limit: a warning; past twice: an error
def test_decompression_bomb_is_skipped_not_fatal(tmp_path, monkeypatch, pixels_over_limit):
    _image(tmp_path / "bomb.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(64 * 64 / pixels_over_limit))
    assert load_image(tmp_path / "bomb.png", 32) is None


def test_prepare_counts_a_decompression_bomb_and_goes_on(tmp_path, tiny_model, monkeypatch):
    from app import model

    root = _imagefolder(tmp_path / "d", 4)
    _image(root / "img3.png", size=(400, 400))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    data = model.prepare_data(cfg, NodeConfig(root, "org-x", None, tmp_path / "cache"))
    assert data.skipped == ["img3.png"] and data.num_train + data.num_heldout == 3


def test_two_processes_filling_one_cache_at_once_both_get_their_data(tmp_path, tiny_model, monkeypatch):
    from app import model

    root = _imagefolder(tmp_path / "d", 4)
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, Path("/unused"))))
    node = NodeConfig(root, "org-x", None, tmp_path / "cache")
    real_save, saves, other = model.torch.save, [], []

    def save_while_another_process_does_too(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        saves.append(f)
        if len(saves) == 1:  # the other one writes and renames its cache between our write and our rename
            other.append(model.prepare_data(cfg, node))

    monkeypatch.setattr(model.torch, "save", save_while_another_process_does_too)
    mine = model.prepare_data(cfg, node)
    assert np.array_equal(mine.train_latents.numpy(), other[0].train_latents.numpy())
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]  # one cache, no temporary left
