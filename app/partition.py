"""Split a labelled image dataset into organisations' folders, as the nodes read them.

    python -m app.partition [DATASET] --out data --partitions 3 [--alpha 0.5] [--seed 0]

DATASET is a Hugging Face dataset id (default: the Oxford Flowers of Flower's diffusion
examples), a dataset saved with `Dataset.save_to_disk`, or an image folder (class subfolders or
`metadata.jsonl`, as `load_dataset("imagefolder")` reads it). Flower Datasets' partitioners do the
split: IID without `--alpha`, Dirichlet over each label's images with it (smaller alpha, more
skew). Each partition becomes `OUT/org-N/`: its images as they were stored, and `metadata.jsonl`
lines `{"file_name", "text", "label"}` with captions from a template over the label names or from
a caption column. An existing organisation folder is only replaced with `--force`.

This runs where the data is (an operator's or an organisation's machine), never in the nodes:
`datasets` and `flwr_datasets` (the `datasets` extra) are imported inside `main` only, so the
app bundle that ships this file does not need them.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import string
import sys
import warnings
from collections import Counter
from pathlib import Path

from app.data import IMAGE_SUFFIXES, METADATA, MIN_IMAGES
from app.offline import _int_at_least
from app.pretrain import CAPTION as DIGITS_CAPTION, DIGITS_SOURCE

DEFAULT_DATASET = "nkirschi/oxford-flowers"
DEFAULT_TEMPLATE = "a photo of a {label}"

# nkirschi/oxford-flowers names its 102 classes by their number in the original release
# ("1" ... "102"); these are the names of those numbers, in order, as commonly used for the
# Oxford 102 Flowers categories. Captions need the names: "a photo of a 77" teaches nothing.
_OXFORD_FLOWERS = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
)
# What a known hub dataset needs beyond its own card: names for its labels, a caption template.
KNOWN_DATASETS = {
    DEFAULT_DATASET: {
        "label_names": {str(number): name for number, name in enumerate(_OXFORD_FLOWERS, start=1)},
        "template": "a photo of a {label}, a type of flower",
    },
    # Built in, no download: scikit-learn's handwritten digits that `make pretrain`'s base never saw.
    DIGITS_SOURCE: {"template": DIGITS_CAPTION},
}
# Where --test-fraction puts each organisation's test images: beside the organisations' folders,
# never inside one, so no node reads them.
TEST_DIR = "test"
# Formats the nodes read, as Pillow names them; anything else is re-encoded as PNG.
_SUFFIX_BY_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}


class PartitionError(ValueError):
    """The dataset or the options cannot give usable organisations; the message says how to fix it."""


def _org_pattern():
    # One rule for organisation names: the node keys' (certs/node_key.py, not a package).
    path = Path(__file__).resolve().parents[1] / "certs" / "node_key.py"
    spec = importlib.util.spec_from_file_location("node_key", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ORG_PATTERN


def load(source: str, split: str):
    """The `split` of a hub dataset id, a saved dataset or an image folder, as a datasets.Dataset."""
    import datasets

    path = Path(source).expanduser()
    if source == DIGITS_SOURCE:
        from app.pretrain import digits_dataset

        return digits_dataset()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise PartitionError(f"{source} has no split {split!r}: it has {', '.join(loaded)}; use --split")
                loaded = loaded[split]
            return loaded
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        if path.exists():
            raise PartitionError(f"{source} is a file: give a saved dataset (save_to_disk), a folder of images "
                                 "or a hub id")
        if source.startswith((".", "/", "~")):
            raise PartitionError(f"{source} does not exist")
        return datasets.load_dataset(source, split=split)
    except PartitionError:
        raise
    except Exception as err:  # the hub and the loaders raise many kinds; all mean "cannot load this"
        raise PartitionError(f"cannot load {source!r} (split {split!r}): {type(err).__name__}: {err}") from None


def _image_column(dataset, wanted: str | None) -> str:
    from datasets import Image

    if wanted:
        if wanted not in dataset.column_names:
            raise PartitionError(f"unknown image column {wanted!r}: the dataset has {', '.join(dataset.column_names)}")
        return wanted
    found = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    if len(found) != 1:
        raise PartitionError(f"the dataset has {len(found)} image columns ({', '.join(found) or 'none'}) among "
                             f"{', '.join(dataset.column_names)}: name one with --image-column")
    return found[0]


def _label_names(dataset, column: str, renames: dict[str, str]) -> list[str]:
    """Each row's label as text: ClassLabel names or values, renamed where `renames` says."""
    from datasets import ClassLabel

    feature = dataset.features[column]
    values = dataset[column]
    labels = [feature.int2str(v) if isinstance(feature, ClassLabel) else str(v) for v in values]
    return [renames.get(label, label) for label in labels]


def _check_template(template: str) -> None:
    fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    if fields - {"label"}:
        raise PartitionError(f"caption template {template!r} uses {{{'}, {'.join(sorted(fields - {'label'}))}}}: "
                             "only {label} is filled in (or give --caption-column)")


def _partitioner(args, label_column: str | None):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if args.alpha is None:
        return IidPartitioner(num_partitions=args.partitions)
    return DirichletPartitioner(num_partitions=args.partitions, partition_by=label_column, alpha=args.alpha,
                                min_partition_size=args.min_images, seed=args.seed)


def split_dataset(args) -> tuple[list, str, str | None]:
    """The partitions (datasets.Dataset each), the image column and the label column (or None)."""
    dataset = load(args.dataset, args.split)
    image_column = _image_column(dataset, args.image_column)
    columns = ", ".join(dataset.column_names)
    for option, column in (("--caption-column", args.caption_column), ("--label-column", args.label_column)):
        if column and column not in dataset.column_names:
            raise PartitionError(f"unknown column {column!r} ({option}): the dataset has {columns}")
    label_column = args.label_column or ("label" if "label" in dataset.column_names else None)
    if label_column is None and args.alpha is not None:
        raise PartitionError(f"Dirichlet (--alpha) splits by label, but the dataset has no column 'label' "
                             f"(columns: {columns}): name one with --label-column")
    if label_column is None and not args.caption_column:
        raise PartitionError(f"captions come from a template over labels, but the dataset has no column 'label' "
                             f"(columns: {columns}): name one with --label-column, or give --caption-column")
    if len(dataset) < args.partitions * MIN_IMAGES:
        raise PartitionError(f"{len(dataset)} images cannot give {args.partitions} organisations {MIN_IMAGES} images "
                             f"each (a node needs {MIN_IMAGES}): use fewer --partitions")
    # Shuffled first, as Flower's FederatedDataset does: IID takes contiguous shards, and many
    # datasets are stored sorted by label. In memory: never write cache files beside a saved dataset.
    dataset = dataset.shuffle(seed=args.seed, keep_in_memory=True)
    partitioner = _partitioner(args, label_column)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            # Flower warns on every redraw below min_partition_size; it raises after 10, handled below.
            warnings.simplefilter("ignore", UserWarning)
            partitions = [partitioner.load_partition(i) for i in range(args.partitions)]
    except ValueError as err:
        if args.alpha is None:
            raise PartitionError(f"Flower's IID partitioner refused: {err}") from None
        raise PartitionError(
            f"Dirichlet alpha={args.alpha} left an organisation with fewer than {args.min_images} images, draw after "
            f"draw ({err}): raise --alpha, lower --partitions or --min-images") from None
    return [_hold_out(p, args) for p in partitions], image_column, label_column


def _hold_out(partition, args) -> tuple:
    """(training part, test part or None) of one organisation's partition: --test-fraction of its
    images (a seeded random draw, so the test set has the organisation's label mix) for testing,
    then at most --max-images of the rest for training."""
    if not args.test_fraction and not args.max_images:
        return partition, None
    order = partition.shuffle(seed=args.seed, keep_in_memory=True)
    n_test = round(len(order) * args.test_fraction)
    train = order.select(range(n_test, len(order)), keep_in_memory=True)
    if args.max_images:
        train = train.select(range(min(args.max_images, len(train))), keep_in_memory=True)
    if len(train) < MIN_IMAGES or (args.test_fraction and n_test == 0):
        raise PartitionError(f"an organisation of {len(partition)} images leaves {len(train)} to train on and "
                             f"{n_test} to test: lower --test-fraction, raise --max-images or use fewer --partitions")
    return train, order.select(range(n_test), keep_in_memory=True) if n_test else None


def _image_bytes(value: dict) -> tuple[bytes, str]:
    """An image as stored (bytes or a file) and its suffix; formats the nodes do not read become PNG."""
    from PIL import Image

    data = value.get("bytes")
    if data is None:
        data = Path(value["path"]).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        suffix = _SUFFIX_BY_FORMAT.get(img.format)
        if suffix in IMAGE_SUFFIXES:
            return data, suffix
        out = io.BytesIO()
        (img.convert("RGB") if img.mode in ("CMYK", "YCbCr") else img).save(out, format="PNG")
        return out.getvalue(), ".png"


def write_org(partition, folder: Path, image_column: str, captions: list[str], labels: list[str] | None) -> None:
    """Write one organisation's folder aside, then put it in place (replacing an old one)."""
    from datasets import Image
    from tqdm import tqdm

    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    records = []
    raw = partition.cast_column(image_column, Image(decode=False))[image_column]
    for index, value in enumerate(tqdm(raw, desc=folder.name, unit="img", disable=None), start=1):
        data, suffix = _image_bytes(value)
        name = f"{index:05d}{suffix}"
        (partial / name).write_bytes(data)
        record = {"file_name": name, "text": captions[index - 1]}
        if labels is not None:
            record["label"] = labels[index - 1]
        records.append(record)
    with open(partial / METADATA, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _table(rows: list[tuple[str, int, list[str] | None]]) -> str:
    lines = [("organisation", "images", "labels", "top labels (share of its images)")]
    for org, count, labels in rows:
        if labels is None:
            lines.append((org, str(count), "-", "-"))
            continue
        top = Counter(labels).most_common(3)
        lines.append((org, str(count), str(len(set(labels))), ", ".join(f"{name} {n / count:.0%}" for name, n in top)))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in lines)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m app.partition",
        description="Split an image dataset into organisations' folders (imagefolder + metadata.jsonl) with "
                    "Flower Datasets' partitioners.")
    parser.add_argument("dataset", nargs="?", default=DEFAULT_DATASET,
                        help=f"Hugging Face dataset id, saved dataset (save_to_disk) or image folder (default: {DEFAULT_DATASET})")
    parser.add_argument("--out", type=Path, default=Path("data"), help="where the organisations' folders go (default: data)")
    parser.add_argument("--partitions", type=_int_at_least(1), default=3, help="number of organisations (default: 3)")
    parser.add_argument("--alpha", type=_positive_float,
                        help="non-IID: Dirichlet over each label's images with this concentration (smaller: more "
                             "skewed; 0.1 is strong, 100 near IID). Without it the split is IID")
    parser.add_argument("--min-images", type=_int_at_least(MIN_IMAGES), default=MIN_IMAGES,
                        help=f"Dirichlet: redraw until every organisation has this many images (default: {MIN_IMAGES}, a node's minimum)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and Dirichlet seed: the same seed gives the same split (default: 0)")
    parser.add_argument("--split", default="train", help="the dataset's split to partition (default: train)")
    parser.add_argument("--prefix", default="org", help="folders are PREFIX-1 ... PREFIX-N, the organisations' names (default: org)")
    parser.add_argument("--image-column", help="default: the dataset's one image column")
    parser.add_argument("--label-column", help="labels for Dirichlet and captions (default: the column 'label', if any)")
    parser.add_argument("--label-names", type=Path,
                        help="JSON object renaming labels for captions, e.g. {\"77\": \"passion flower\"}")
    parser.add_argument("--caption-template",
                        help=f"caption from the label, e.g. \"a photo of a {{label}}, a type of flower\" (default: "
                             f"{DEFAULT_TEMPLATE!r}, or the known dataset's own)")
    parser.add_argument("--caption-column", help="take each image's caption from this column instead of the template")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help=f"put this share of each organisation's images in OUT/{TEST_DIR}/ORG, which no node "
                             "reads: a test set for reported figures (`make compare`) (default: 0)")
    parser.add_argument("--max-images", type=_int_at_least(MIN_IMAGES),
                        help="at most this many training images per organisation (default: all)")
    parser.add_argument("--force", action="store_true", help="replace organisation folders that already exist")
    args = parser.parse_args(argv)
    if not 0 <= args.test_fraction < 1:
        parser.error(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.caption_column and args.caption_template:
        parser.error("give --caption-column or --caption-template, not both")
    pattern = _org_pattern()
    names = [f"{args.prefix}-{i}" for i in range(1, args.partitions + 1)]
    if not pattern.match(names[-1]):
        parser.error(f"--prefix {args.prefix!r} gives organisation names like {names[-1]!r}: use lowercase letters, "
                     f"digits and '-', starting with a letter or digit, at most 40 in all ({pattern.pattern})")
    return args, names


def main(argv: list[str] | None = None) -> None:
    args, names = parse_args(argv)
    try:
        run(args, names)
    except PartitionError as err:
        sys.exit(f"error: {err}")


def run(args, names: list[str]) -> None:
    folders = [args.out / name for name in names]
    tests = [args.out / TEST_DIR / name for name in names]
    # Checked before anything is loaded or written: a split half written over is worse than none.
    existing = [f for f in folders + tests if f.exists() and (not f.is_dir() or any(f.iterdir()))]
    if existing and not args.force:
        raise PartitionError(f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}: "
                             "an organisation's folder is only replaced with --force (or choose another --out or --prefix)")
    known = KNOWN_DATASETS.get(args.dataset, {})
    renames = dict(known.get("label_names", {}))
    if args.label_names:
        try:
            renames = {str(k): str(v) for k, v in json.loads(args.label_names.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError) as err:
            raise PartitionError(f"--label-names {args.label_names}: not a readable JSON object ({err})") from None
    template = args.caption_template or known.get("template", DEFAULT_TEMPLATE)
    if not args.caption_column:
        _check_template(template)

    parts, image_column, label_column = split_dataset(args)
    how = "IID" if args.alpha is None else f"Dirichlet by {label_column!r}, alpha={args.alpha}"
    print(f"{args.dataset} [{args.split}]: {sum(len(p) for pair in parts for p in pair if p)} images into "
          f"{len(parts)} organisations ({how}, seed {args.seed})")
    # Every organisation's folder and its test folder, if any: (partition, folder).
    jobs = [(p, f) for (train, test), folder, test_folder in zip(parts, folders, tests)
            for p, f in ((train, folder), (test, test_folder)) if p is not None]
    # Every caption first: a bad one must stop the command before any folder is written.
    contents = []
    for partition, _ in jobs:
        labels = _label_names(partition, label_column, renames) if label_column else None
        if args.caption_column:
            captions = partition[args.caption_column]
            empty = sum(1 for c in captions if not isinstance(c, str) or not c.strip())
            if empty:
                raise PartitionError(f"column {args.caption_column!r} has {empty} empty or non-text caption(s): "
                                     "fill them in or use --caption-template")
        else:
            captions = [template.format(label=label) for label in labels]
        contents.append((captions, labels))
    for (partition, folder), (captions, labels) in zip(jobs, contents):
        write_org(partition, folder, image_column, captions, labels)
    rows = [(str(folder.relative_to(args.out)), len(partition), labels)
            for (partition, folder), (_, labels) in zip(jobs, contents)]
    print(_table(rows))
    source = f"column {args.caption_column!r}" if args.caption_column else f"{template!r}, e.g. {contents[0][0][0]!r}"
    test_note = f"; test images in {args.out / TEST_DIR}/, which no node reads" if any(t for _, t in parts) else ""
    print(f"captions: {source}; written to {args.out}/ ({', '.join(names)}){test_note}")
    strays = sorted(p.name for p in args.out.glob(f"{args.prefix}-*") if p.is_dir() and p.name not in names)
    if strays:
        print(f"note: {args.out} also holds {', '.join(strays)}, not from this split")


if __name__ == "__main__":
    main()
