"""`python -m app.partition`: a labelled dataset into organisations' folders, through Flower's partitioners.

The dataset is built here (PIL images, a ClassLabel column, a caption column), saved with
`save_to_disk` or written as an image folder: nothing is fetched (HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from app.data import discover, load_image
from app.partition import KNOWN_DATASETS, main
from conftest import REPO

os.environ["HF_DATASETS_OFFLINE"] = "1"

LABELS = ("daisy", "rose", "tulip", "iris", "lotus", "poppy")
PER_LABEL = 20


def _images():
    """Yield (label index, image, caption): every image differs, so each can be traced to its org."""
    from PIL import Image

    for label, name in enumerate(LABELS):
        for i in range(PER_LABEL):
            img = Image.new("RGB", (32, 32), (40 * label, 255 - 40 * label, 128))
            img.putpixel((i, 0), (i, label, 7))
            yield label, img, f"a {name} photographed in garden {i}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from datasets import ClassLabel, Dataset, Features, Image, Value

    rows = list(zip(*_images()))
    features = Features({"image": Image(), "label": ClassLabel(names=list(LABELS)), "text": Value("string")})
    ds = Dataset.from_dict({"label": list(rows[0]), "image": list(rows[1]), "text": list(rows[2])}, features=features)
    path = tmp_path_factory.mktemp("flowers") / "saved"
    ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def source_images(saved) -> dict[str, tuple[str, str]]:
    """sha256 of each stored image -> (label name, caption column)."""
    from datasets import Image, load_from_disk

    ds = load_from_disk(str(saved)).cast_column("image", Image(decode=False))
    return {hashlib.sha256(row["image"]["bytes"]).hexdigest(): (LABELS[row["label"]], row["text"]) for row in ds}


def _orgs(out: Path) -> dict[str, list[dict]]:
    """What a node would read: each org folder through app.data, with the metadata's label."""
    orgs = {}
    for folder in sorted(out.iterdir()):
        examples = discover(folder, default_caption=None)
        meta = {json.loads(line)["file_name"]: json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()}
        orgs[folder.name] = [{"sha": hashlib.sha256(e.path.read_bytes()).hexdigest(), "caption": e.caption,
                              "label": meta[e.name]["label"], "path": e.path} for e in examples]
    return orgs


def _label_skew(orgs: dict[str, list[dict]]) -> float:
    """Mean total-variation distance between each org's label distribution and the whole dataset's."""
    overall = {name: 1 / len(LABELS) for name in LABELS}
    distances = []
    for rows in orgs.values():
        counts = Counter(r["label"] for r in rows)
        distances.append(0.5 * sum(abs(counts[k] / len(rows) - overall[k]) for k in LABELS))
    return sum(distances) / len(distances)


def test_iid_split_gives_balanced_readable_organisations(saved, source_images, tmp_path, capsys):
    main([str(saved), "--out", str(tmp_path / "data"), "--partitions", "3"])
    orgs = _orgs(tmp_path / "data")
    assert list(orgs) == ["org-1", "org-2", "org-3"]
    assert [len(rows) for rows in orgs.values()] == [40, 40, 40]
    # Every source image in exactly one organisation, byte for byte, under its own label.
    shas = [r["sha"] for rows in orgs.values() for r in rows]
    assert sorted(shas) == sorted(source_images)
    for rows in orgs.values():
        for r in rows:
            assert r["label"] == source_images[r["sha"]][0]
            assert r["caption"] == f"a photo of a {r['label']}"
    assert load_image(orgs["org-2"][0]["path"], 32).shape == (32, 32, 3)
    assert _label_skew(orgs) < 0.25
    table = capsys.readouterr().out
    assert "IID" in table and "org-3" in table and "40" in table


def test_dirichlet_skews_labels_and_the_seed_fixes_the_split(saved, tmp_path, capsys):
    def split(seed, alpha, out):
        main([str(saved), "--out", str(tmp_path / out), "--partitions", "3", "--seed", str(seed)]
             + (["--alpha", alpha] if alpha else []))
        return _orgs(tmp_path / out)

    iid, skewed = split(0, None, "iid"), split(0, "0.1", "a")
    # 120 images in all, unequal sizes, and far from the overall label mix (IID: close to it).
    assert sum(map(len, skewed.values())) == 120 and len({len(rows) for rows in skewed.values()}) > 1
    assert _label_skew(skewed) > 0.4 > 0.25 > _label_skew(iid), (_label_skew(skewed), _label_skew(iid))
    assert "Dirichlet by 'label', alpha=0.1" in capsys.readouterr().out

    def layout(orgs):
        return {org: [(r["path"].name, r["sha"], r["caption"]) for r in rows] for org, rows in orgs.items()}

    assert layout(split(0, "0.1", "b")) == layout(skewed)
    assert layout(split(1, "0.1", "c")) != layout(skewed)


def test_captions_from_a_column_or_a_template_over_renamed_labels(saved, source_images, tmp_path):
    main([str(saved), "--out", str(tmp_path / "col"), "--partitions", "2", "--caption-column", "text"])
    rows = [r for rows in _orgs(tmp_path / "col").values() for r in rows]
    assert all(r["caption"] == source_images[r["sha"]][1] for r in rows)

    names = tmp_path / "names.json"
    names.write_text(json.dumps({"rose": "damask rose"}))
    main([str(saved), "--out", str(tmp_path / "tpl"), "--partitions", "2", "--label-names", str(names),
          "--caption-template", "a photo of a {label}, a type of flower"])
    captions = {r["caption"] for rows in _orgs(tmp_path / "tpl").values() for r in rows}
    assert "a photo of a damask rose, a type of flower" in captions
    assert "a photo of a tulip, a type of flower" in captions and len(captions) == len(LABELS)
    # The default dataset's labels are numbers "1".."102"; captions need the flowers' names.
    flowers = KNOWN_DATASETS["nkirschi/oxford-flowers"]["label_names"]
    assert sorted(flowers, key=int) == [str(n) for n in range(1, 103)] and len(set(flowers.values())) == 102


def test_existing_organisations_are_replaced_only_with_force(saved, tmp_path, capsys):
    out = tmp_path / "data"
    main([str(saved), "--out", str(out), "--partitions", "2", "--seed", "0"])
    (out / "org-2" / "notes.txt").write_text("the organisation's own file")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(SystemExit, match=r"org-1.*org-2.*already exist.*--force"):
        main([str(saved), "--out", str(out), "--partitions", "2", "--seed", "1"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    main([str(saved), "--out", str(out), "--partitions", "2", "--seed", "1", "--force"])
    assert not (out / "org-2" / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["org-1", "org-2"]  # no leftovers beside them
    assert (out / "org-1" / "metadata.jsonl").read_bytes() != before[out / "org-1" / "metadata.jsonl"]


@pytest.mark.parametrize(("args", "message"), [
    (["--caption-column", "caption"], r"unknown column 'caption'.*the dataset has label, image, text"),
    (["--label-column", "species", "--alpha", "1"], r"unknown column 'species'"),
    (["--alpha", "0.1", "--partitions", "6", "--min-images", "19"], r"alpha=0.1 left an organisation with fewer than 19 images.*raise --alpha"),
    (["--partitions", "61"], r"120 images cannot give 61 organisations"),
    (["--caption-template", "a {colour} {label}"], r"uses \{colour\}"),
])
def test_unusable_options_are_refused_before_anything_is_written(saved, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main([str(saved), "--out", str(tmp_path / "data"), *args])
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--alpha", "0"], "--alpha: must be greater than 0"),
    (["--alpha", "-1"], "--alpha: must be greater than 0"),
    (["--partitions", "0"], "--partitions: must be at least 1"),
    (["--prefix", "Clinic"], "--prefix 'Clinic' gives organisation names like 'Clinic-3'"),
])
def test_bad_arguments_are_usage_errors(saved, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(saved), "--out", str(tmp_path / "data"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_command_line_on_an_image_folder_with_class_subfolders(tmp_path):
    """The real entry point, on the other local layout: class subfolders, as imagefolder reads them."""
    source = tmp_path / "photos"
    for label, img, _ in _images():
        (source / LABELS[label]).mkdir(parents=True, exist_ok=True)
        img.save(source / LABELS[label] / f"{len(list((source / LABELS[label]).iterdir())):03d}.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "app.partition", str(source), "--out", str(tmp_path / "data"),
                           "--partitions", "4", "--alpha", "0.5", "--prefix", "clinic"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    orgs = _orgs(tmp_path / "data")
    assert list(orgs) == ["clinic-1", "clinic-2", "clinic-3", "clinic-4"]
    assert sum(map(len, orgs.values())) == len(LABELS) * PER_LABEL
    assert {r["label"] for rows in orgs.values() for r in rows} == set(LABELS)
    for org, rows in orgs.items():
        assert re.search(rf"^{org} +{len(rows)} +\d+ ", done.stdout, re.MULTILINE), done.stdout


def test_a_dataset_without_labels_or_with_an_empty_caption_is_refused(tmp_path):
    from datasets import Dataset, Features, Image, Value

    images = [img for _, img, _ in _images()][:8]
    texts = [f"photo {i}" for i in range(7)] + [""]
    saved = tmp_path / "unlabelled"
    Dataset.from_dict({"image": images, "text": texts}, features=Features({"image": Image(), "text": Value("string")})
                      ).save_to_disk(str(saved))
    out = tmp_path / "data"
    for args, message in [(["--caption-column", "text"], r"'text' has 1 empty or non-text caption"),
                          ([], r"captions come from a template over labels.*no column 'label'.*--caption-column"),
                          (["--alpha", "1", "--caption-column", "text"], r"Dirichlet \(--alpha\) splits by label")]:
        with pytest.raises(SystemExit, match=message):
            main([str(saved), "--out", str(out), "--partitions", "2", *args])
        assert not out.exists()


def test_the_built_in_digits_keep_the_pretraining_classes_out_and_a_test_set_aside(tmp_path, capsys):
    from app.pretrain import ORG_CLASSES

    main(["sklearn-digits", "--out", str(tmp_path), "--partitions", "3", "--alpha", "0.3",
          "--test-fraction", "0.25", "--max-images", "12"])
    seen = {}
    for org in ("org-1", "org-2", "org-3"):
        train = [json.loads(x) for x in (tmp_path / org / "metadata.jsonl").read_text().splitlines()]
        test = [json.loads(x) for x in (tmp_path / "test" / org / "metadata.jsonl").read_text().splitlines()]
        assert len(train) == 12 and test, org
        labels = {int(r["label"]) for r in train + test}
        assert labels <= set(ORG_CLASSES), f"{org} holds a pretraining class: {labels}"
        assert all(r["text"] == f"a handwritten digit {r['label']}" for r in train + test)
        # No image is both trained on and tested on, within or across organisations.
        for part, rows in (("train", train), ("test", test)):
            folder = tmp_path / (org if part == "train" else f"test/{org}")
            for r in rows:
                digest = hashlib.sha256((folder / r["file_name"]).read_bytes()).hexdigest()
                assert seen.setdefault(digest, (org, part)) == (org, part)
        assert discover(tmp_path / org, None) and load_image(tmp_path / org / train[0]["file_name"], 16) is not None
    assert "which no node reads" in capsys.readouterr().out
