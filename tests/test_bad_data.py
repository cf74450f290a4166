"""Bad data on a real federation: TLS SuperLink, four SuperNodes, `flwr run`, SecAgg+, min-nodes=3.

org-1 and org-2 hold clean demo images. `messy` holds good images plus the ways a real folder goes
wrong: a corrupt file, a text file named .jpg, a decompression bomb, a 1x1 image, a phone photo
stored turned with an EXIF orientation, and a notes.txt. `empty` holds only unusable files. `broken`
has a cache folder that is a file, which fails with Python's own error, path included. What a user
must get: messy takes part on its usable images and its skipped ones are counted; empty and broken
are left out with the problem, which reaches the coordinator without a file or folder name (those
stay in the organisation's own log); the run completes with the other three, and their aggregate is
their example-weighted FedAvg.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import NodeConfig, RunConfig
from app.data import Example
from app.outputs import read_adapter
from conftest import tiny_run_config, with_defaults
from federation import LocalFederation

pytestmark = pytest.mark.federation

CAPTION = "a shape on a white background"
# The files of messy's folder that no pipeline can use; each must be skipped and counted.
MESSY_UNUSABLE = ("corrupt.png", "scan.jpg", "bomb.png", "dot.png")
EMPTY_FILES = ("corrupt.png", "scan.jpg", "dot.png")  # plus notes.txt, not an image by its name


def write_unusable(folder: Path, names: tuple[str, ...]) -> None:
    makers = {
        "corrupt.png": lambda p: p.write_bytes(random.Random(0).randbytes(4096)),
        "scan.jpg": lambda p: p.write_text("minutes of the data committee, not a scan\n"),
        # 144 Mpx in 17 KB: over Pillow's limit (89 Mpx), where it only warns and would decode it.
        "bomb.png": lambda p: Image.new("1", (12000, 12000)).save(p),
        "dot.png": lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p),
    }
    for name in names:
        makers[name](folder / name)
    (folder / "notes.txt").write_text("exported from the PACS on Monday\n")


def write_phone_photo(path: Path) -> Image.Image:
    """A portrait photo, red top half, blue bottom half, stored turned with EXIF orientation 6
    (viewers rotate it 90 degrees clockwise), as phones store them. Returns it upright."""
    upright = Image.new("RGB", (48, 96), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 48, 48, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return upright


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-data")
    messy, empty = root / "messy", root / "empty"
    messy.mkdir(), empty.mkdir()
    for png in sorted((demo_data / "org-3").glob("*.png")):  # a plain folder: no metadata.jsonl
        shutil.copy(png, messy / png.name)
    write_phone_photo(messy / "phone.jpg")
    write_unusable(messy, MESSY_UNUSABLE)
    write_unusable(empty, EMPTY_FILES)
    return {"org-1": demo_data / "org-1", "org-2": demo_data / "org-2", "messy": messy, "empty": empty}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tls, tiny_model, folders):
    work = tmp_path_factory.mktemp("federation-bad-data")
    nodes = {org: {"data-dir": str(folder), "org": org, "cache-dir": str(work / f"cache-{org}")}
             for org, folder in folders.items()}
    for org in ("messy", "empty"):
        nodes[org]["default-caption"] = CAPTION
    broken_cache = work / "cache-of-patient-4711"
    broken_cache.write_text("a file where the node's cache folder should be\n")
    nodes["broken"] = {"data-dir": str(folders["org-1"]), "org": "broken", "cache-dir": str(broken_cache)}
    out = work / "out"
    cfg = tiny_run_config(tiny_model, out, **{"num-server-rounds": 1, "min-nodes": 3, "sample-every": 0})
    with LocalFederation(work, tls, nodes) as fed:
        result = fed.run_app(cfg)
        status = fed.last_run_status()
    log = result.stdout + result.stderr
    print(log[-5000:])
    assert status == "finished:completed", log[-5000:]
    return {"out": out, "cfg": cfg, "log": log, "work": work, "broken_cache": broken_cache,
            "node_log": {org: (work / f"{org}.log").read_text(errors="replace") for org in nodes}}


def history(out: Path) -> dict[int, dict]:
    return {m["round"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def node(folders: dict[str, Path], org: str, cache: Path) -> NodeConfig:
    return NodeConfig(folders[org], org, CAPTION if org == "messy" else None, cache)


def test_the_run_goes_on_with_the_usable_organisations(run):
    h = history(run["out"])
    assert sorted(h) == [0, 1]
    assert h[1]["participants"] == h[1]["aggregated"] == ["messy", "org-1", "org-2"]
    assert h[0]["heldout_orgs"] == h[1]["heldout_orgs"] == ["messy", "org-1", "org-2"]


def test_unusable_images_are_skipped_and_counted(run, folders):
    from app import model

    cfg = RunConfig.from_flower(with_defaults(run["cfg"]))
    # What messy's node encoded, read back from its own cache (nothing is encoded again).
    usable = model.prepare_data(cfg, node(folders, "messy", run["work"] / "cache-messy"))
    assert sorted(usable.skipped) == sorted(MESSY_UNUSABLE)
    good = len(list(folders["messy"].glob("0*.png"))) + 1  # the demo images and the phone photo
    assert usable.num_train + usable.num_heldout == good

    h = history(run["out"])
    assert h[1]["skipped_images_by_org"] == {"messy": len(MESSY_UNUSABLE), "org-1": 0, "org-2": 0}
    assert h[1]["num_examples_by_org"]["messy"] == usable.num_train
    assert (f"node of messy ready: {usable.num_train} train / {usable.num_heldout} held-out images, "
            f"{len(MESSY_UNUSABLE)} unusable skipped") in run["log"]
    # The organisation's own log says which files and why, so that its admin can fix them.
    messy_log = run["node_log"]["messy"]
    for name, why in [("corrupt.png", "cannot identify image file"), ("scan.jpg", "cannot identify image file"),
                      ("bomb.png", "decompression bomb"), ("dot.png", "1x1, under half the training resolution")]:
        assert any(f"skipping {folders['messy'] / name} (" in line and why in line for line in messy_log.splitlines()), name
    assert "notes.txt" not in messy_log  # not an image by its name: neither used nor counted


def test_the_phone_photo_was_used_upright(run, folders, tmp_path):
    """The latent messy's node cached (and trained on) for phone.jpg is the upright photo's."""
    import torch

    from app import model

    cfg = RunConfig.from_flower(with_defaults(run["cfg"]))
    [cache] = (run["work"] / "cache-messy").glob("latents-*.pt")
    cached = torch.load(cache, weights_only=True)
    used = cached["latents"][cached["names"].index("phone.jpg")]

    with Image.open(folders["messy"] / "phone.jpg") as stored:  # the pixels as stored, EXIF ignored
        stored.save(tmp_path / "as-stored.png")
        stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    ref = model._encode(cfg, [Example(tmp_path / n, CAPTION, n) for n in ("upright.png", "as-stored.png")], tmp_path)
    upright, as_stored = ref["latents"]
    assert float((used - upright).abs().max()) < 1e-4
    assert float((used - as_stored).abs().max()) > 0.1


def test_an_organisation_without_a_usable_image_is_left_out_with_a_clear_message(run, folders):
    message = f"DataError: none of the {len(EMPTY_FILES)} image files in the data folder is usable"
    # The operator sees which organisation and why; the organisation's own log also says which files.
    assert f"a node could not prepare its data: empty: {message}" in run["log"], run["log"][-5000:]
    assert message in run["node_log"]["empty"] and f"{folders['empty']}: {', '.join(sorted(EMPTY_FILES))}" in run["node_log"]["empty"]
    for name in EMPTY_FILES:
        assert f"skipping {folders['empty'] / name} (" in run["node_log"]["empty"]
    assert "empty" not in history(run["out"])[1]["aggregated"]


def test_no_file_or_folder_name_reaches_the_coordinator(run, folders):
    """Neither the data error's names nor the path in an unexpected error's message (issue 15, item 4)."""
    assert "a node could not prepare its data: broken: NotADirectoryError: " in run["log"], run["log"][-5000:]
    assert str(run["broken_cache"]) in run["node_log"]["broken"] and "Traceback" in run["node_log"]["broken"]
    records = (run["out"] / "metrics.jsonl").read_text()
    for text in (run["log"], records):
        for name in (*EMPTY_FILES, *MESSY_UNUSABLE, "patient-4711", str(run["broken_cache"]),
                     *(str(folder) for folder in folders.values())):
            assert name not in text, name


def test_the_aggregate_is_the_weighted_fedavg_of_the_others(run, folders):
    """Recompute the three participants' updates outside Flower (as in test_federation.py), from the
    latents their nodes cached."""
    import torch

    from app.training import local_update

    cfg = RunConfig.from_flower(with_defaults(run["cfg"]))
    before, after = (list(read_adapter(run["out"] / "rounds" / f"round-{r:04d}").values()) for r in (0, 1))
    revealed = [a.astype(np.float64) - b for a, b in zip(after, before)]
    updates, counts = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes train: another thread count sums in another order
    try:
        for org in ("messy", "org-1", "org-2"):
            update, n, _ = local_update(cfg, node(folders, org, run["work"] / f"cache-{org}"), before, 1)
            updates.append(update)
            counts.append(n)
    finally:
        torch.set_num_threads(threads)
    assert counts == [history(run["out"])[1]["num_examples_by_org"][o] for o in ("messy", "org-1", "org-2")]
    plain = [sum(n * u[i].astype(np.float64) for u, n in zip(updates, counts)) / sum(counts) for i in range(len(before))]
    err = max(float(np.max(np.abs(p - r))) for p, r in zip(plain, revealed))
    scale = max(float(np.max(np.abs(p))) for p in plain)
    print(f"counts {counts}: SecAgg+ vs weighted FedAvg of the three {err:.2e} (update scale {scale:.2e})")
    assert scale > 1e-4 and err < 1e-5, (err, scale)
