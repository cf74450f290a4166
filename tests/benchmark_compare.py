"""Does federating pay? Test loss of every way the same organisations could train, each stopped early.

    make compare          (or: python tests/benchmark_compare.py; --help for the protocol's settings)

By default on the offline pretrained base (`make pretrain`: the tiny pipeline trained on digits 0-4)
and organisations holding the other digits with Dirichlet label skew (`make partition
DATASET=sklearn-digits`, with a test folder per organisation that no node reads). For every seed it
trains, from the same base and with the same S local steps per round, batch B and learning rate:

- base model:   nothing (the LoRA adapter starts at zero: it is the base model);
- alone: ORG:   one organisation on its own images, round by round exactly as a node trains in a
                federation of one (training.local_update: the received adapter, a fresh Adam
                optimizer each round, the node's per-round seed);
- FedAvg:       the real loopback federation (TLS SuperLink, one SuperNode per organisation with a
                registered key, `flwr run`), aggregation="fedavg";
- SecAgg+:      the same federation with aggregation="secagg+";
- pooled:       for reference only, one holder of every organisation's training images (as if they
                had been shared), N x S steps per round: the federation's total compute.

Each method is stopped early by one rule (`early_stop`): after each round its validation loss is
measured (the app's held-out loss, on the nodes' own held-out split, data.split: alone on its
organisation's, pooled and the federations on the union, as the ServerApp records it in
metrics.jsonl), and training stops after --patience rounds without a new best, at most --rounds
rounds; the round with the best validation loss is the method's result. The federations run all
rounds and the same rule picks from their metrics.jsonl, as if they had stopped.

The reported figures come from the test folders (DATA/test/ORG), never read by a node nor used for
stopping: each selected adapter's test loss per organisation, on the union, and per class (from
metadata.jsonl's labels), with fixed noise (seed 0) whatever the run's seed; mean +- std over
--seeds. It checks its measurement of the selected FedAvg adapter against the nodes' own in the
run, compares SecAgg+ with FedAvg on round 1 (the same updates) against the quantization step the
run recorded, prints which of the stated expectations (docs/performance.md) hold, and writes
results.json, samples.png (a column per method, a row per class) and each run's own outputs
(runs/seed-S/fedavg, runs/seed-S/secagg+) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from app.training import round_seed  # noqa: E402
from app.config import NodeConfig, RunConfig  # noqa: E402

UNION = "union"
BASE, FEDAVG, SECAGG, POOLED = "base model", "FedAvg", "SecAgg+", "pooled (reference)"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL, DEFAULT_DATA = REPO / "models" / "digits-sd", REPO / "data" / "digits"
# What `make compare` runs when these are missing (the protocol's data: docs/performance.md).
MAKE_MODEL, MAKE_DATA = "make pretrain", "make compare-data"
# The test loss's noise: the same for every seed, so that seeds differ only by training.
TEST_SEED = 0


def alone(org: str) -> str:
    return f"alone: {org}"


# --- Training outside a federation ---------------------------------------------------------------

def org_data(cfg: RunConfig, nodes: dict[str, NodeConfig]) -> dict:
    """Each organisation's encoded images, split as its node splits them (from the node's cache)."""
    from app import model

    return {org: model.prepare_data(cfg, node) for org, node in nodes.items()}


def pooled_data(data: dict):
    """One holder of every organisation's training images; held-out images stay held out."""
    import torch

    from app.model import EncodedData

    parts = list(data.values())
    return EncodedData(torch.cat([d.train_latents for d in parts]), torch.cat([d.train_embeds for d in parts]),
                       torch.cat([d.heldout_latents for d in parts]), torch.cat([d.heldout_embeds for d in parts]),
                       [s for d in parts for s in d.skipped])


def initial_adapter(cfg: RunConfig) -> list[np.ndarray]:
    """The adapter every node and the ServerApp start from (same seed): equal to the base model."""
    from app import model

    return list(model.lora_state(model.LoraUNet.load(cfg).unet).values())


def rounds_alone(cfg: RunConfig, data, start: list[np.ndarray], steps: int, org: str):
    """What a node computes round after round in a federation of one, with its validation loss:
    yields (held-out loss, adapter) for round 0 (`start`), 1, 2, ... Each round it loads the adapter
    it holds, trains `steps` steps with a fresh optimizer and the node's seed for that round
    (training.local_update), and keeps the result."""
    from app import model

    net = model.LoraUNet.load(cfg)
    arrays = start
    for rnd in itertools.count():
        model.load_lora(net.unet, net.names, arrays)
        if rnd:
            net.train(data, steps, cfg.batch_size, cfg.learning_rate, round_seed(cfg.seed, rnd, org))
            arrays = list(model.lora_state(net.unet).values())
        yield net.heldout_loss(data, cfg.eval_timesteps, cfg.seed, cfg.batch_size), arrays


def train_rounds(cfg: RunConfig, data, start: list[np.ndarray], rounds: int, steps: int, org: str) -> list[np.ndarray]:
    """The adapter after exactly `rounds` rounds alone."""
    return next(itertools.islice(rounds_alone(cfg, data, start, steps, org), rounds, None))[1]


def early_stop(candidates, patience: int, max_rounds: int) -> tuple[int, object, list[float]]:
    """The one stopping rule of every method: `candidates` yields (validation loss, result) for round
    0, 1, ...; stop after `patience` rounds without a new best, or after round `max_rounds`.
    Returns (best round, its result, the losses seen). Consumed lazily: alone and pooled train
    only the rounds the rule asks for."""
    losses, best, result = [], 0, None
    for rnd, (loss, item) in enumerate(itertools.islice(candidates, max_rounds + 1)):
        losses.append(loss)
        if rnd == 0 or loss < losses[best]:
            best, result = rnd, item
        elif rnd - best >= patience:
            break
    return best, result, losses


# --- Measuring ------------------------------------------------------------------------------------

def heldout_table(cfg: RunConfig, data: dict, adapters: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """{method: {org: held-out loss, ..., "union": ...}} with the app's own evaluation."""
    from app import model

    net = model.LoraUNet.load(cfg)
    table = {}
    for method, arrays in adapters.items():
        model.load_lora(net.unet, net.names, arrays)
        row = {org: net.heldout_loss(d, cfg.eval_timesteps, cfg.seed, cfg.batch_size) for org, d in data.items()}
        row[UNION] = union_loss(row, {org: d.num_heldout for org, d in data.items()})
        table[method] = row
    return table


def union_loss(by_org: dict[str, float], heldout_counts: dict[str, int]) -> float:
    """The mean over every organisation's held-out images: per-organisation means weighted by their
    counts, as the ServerApp reports a federation's held-out loss."""
    from app.reporting import weighted

    return weighted([(by_org[o], n) for o, n in heldout_counts.items()])


def labels_of(folder: Path) -> dict[str, str]:
    """{file name: label} from an organisation's metadata.jsonl (empty where it has no labels)."""
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else []
    return {r["file_name"]: str(r["label"]) for r in rows if "label" in r}


def test_sets(cfg: RunConfig, folders: dict[str, Path]) -> dict[tuple[str, str], object]:
    """{(org, label): EncodedData holding that organisation's test images of that label as held-out}
    (label "" where the folder has no labels): measured once each, summed up by `test_table`."""
    import torch

    from app import model
    from app.data import discover

    sets = {}
    for org, folder in folders.items():
        examples, labels = discover(folder, None), labels_of(folder)
        encoded = model._encode(cfg, examples, folder)  # every image, none trained on: no split
        by_label: dict[str, list[int]] = {}
        for i, name in enumerate(encoded["names"]):
            by_label.setdefault(labels.get(name, ""), []).append(i)
        empty = torch.empty(0)
        for label, rows in sorted(by_label.items()):
            sets[org, label] = model.EncodedData(empty, empty, encoded["latents"][rows], encoded["embeds"][rows], [])
    return sets


def test_table(cfg: RunConfig, sets: dict, adapters: dict[str, list[np.ndarray]],
               unseen: dict[str, set[str]]) -> dict[str, dict[str, float]]:
    """{method: {org: test loss, "digit L" (or the label): ..., "union": ..., "unseen": ...}}; "unseen":
    the test loss on the labels that method's only organisation never trained on (alone rows)."""
    from app import model
    from app.reporting import weighted

    net = model.LoraUNet.load(cfg)
    table = {}
    for method, arrays in adapters.items():
        model.load_lora(net.unet, net.names, arrays)
        # One forward pass per image and timestep grid: the batch does not change the figure.
        loss = {k: (net.heldout_loss(d, cfg.eval_timesteps, TEST_SEED, cfg.eval_timesteps), d.num_heldout)
                for k, d in sets.items()}
        row = {UNION: weighted(list(loss.values()))}
        for org in sorted({o for o, _ in loss}):
            row[org] = weighted([v for (o, _), v in loss.items() if o == org])
        for label in sorted({lab for _, lab in loss if lab}):
            row[f"digit {label}"] = weighted([v for (_, lab), v in loss.items() if lab == label])
        never = unseen.get(method)
        if never:
            row["unseen"] = weighted([v for (_, lab), v in loss.items() if lab in never])
        table[method] = row
    return table


def mean_std(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    return {m: {c: (float(np.mean([t[m][c] for t in tables])), float(np.std([t[m][c] for t in tables])))
                for c in tables[0][m]} for m in tables[0]}


@dataclass
class Expectation:
    text: str
    holds: bool
    detail: str


def expectations(table: dict[str, dict[str, tuple[float, float]]], orgs: list[str]) -> list[Expectation]:
    """The expectations docs/performance.md states before the results, on the seeds' mean test losses."""
    mean = {m: {c: v[0] for c, v in row.items()} for m, row in table.items()}
    best = min((alone(o) for o in orgs), key=lambda m: mean[m][UNION])
    b, p = mean[best][UNION], mean[POOLED][UNION]
    out = []
    for fed in (FEDAVG, SECAGG):
        f = mean[fed][UNION]
        out.append(Expectation(f"{fed} beats every organisation alone on the union", f < b,
                               f"{f:.5f} vs best alone ({best}) {b:.5f}"))
        closed = (b - f) / (b - p) if b != p else float("nan")
        out.append(Expectation(f"{fed} closes at least half of the alone-to-pooled gap", closed >= 0.5,
                               f"closes {closed:.0%} of {best} {b:.5f} -> pooled {p:.5f}"))
        better = [o for o in orgs if mean[fed][o] <= mean[alone(o)][o]]
        out.append(Expectation(f"{fed}: each organisation does at least as well on its own test images, "
                               f"for at least {len(orgs) - 1} of {len(orgs)}", len(better) >= len(orgs) - 1,
                               ", ".join(f"{o} {mean[fed][o]:.5f} vs alone {mean[alone(o)][o]:.5f}" for o in orgs)))
    out.append(Expectation("pooled is the ceiling (lowest union test loss)",
                           all(p <= row[UNION] for m, row in mean.items() if m != POOLED), f"{p:.5f}"))
    return out


def format_table(table: dict[str, dict[str, tuple[float, float]]], columns: list[str]) -> str:
    width = max(len(m) for m in table)
    cell = max(16, *(len(c) for c in columns))
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>{cell}}" for c in columns)]
    for m, row in table.items():
        cells = [f"{row[c][0]:.4f} ± {row[c][1]:.4f}" if c in row else "-" for c in columns]
        lines.append(f"{m:<{width}}  " + "  ".join(f"{x:>{cell}}" for x in cells))
    return "\n".join(lines)


def sample_sheet(cfg: RunConfig, adapters: dict[str, list[np.ndarray]], prompts: list[str], path: Path,
                 cell: int = 64) -> None:
    """One PNG: a column per method, a row per prompt, the same seeds everywhere (app's Sampler)."""
    from dataclasses import replace

    from PIL import Image, ImageDraw

    from app import model

    cfg = replace(cfg, sample_prompts=tuple(prompts))
    sampler = model.Sampler(cfg, model.LoraUNet.load(cfg))
    header = 14
    sheet = Image.new("RGB", (cell * len(adapters), header + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, (method, arrays) in enumerate(adapters.items()):
        row_img = sampler.grid(None if method == BASE else arrays)
        draw.text((col * cell + 2, 1), method.replace("alone: ", "").replace(" (reference)", "")[:10], fill="black")
        for r in range(len(prompts)):
            tile = row_img.crop((r * cfg.resolution, 0, (r + 1) * cfg.resolution, cfg.resolution))
            sheet.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (col * cell, header + r * cell))
    sheet.save(path)


# --- The federation -------------------------------------------------------------------------------

def run_federation(fed, run_config: dict, out: Path) -> list[np.ndarray]:
    """One real run through the `flwr` CLI; returns the final global adapter it wrote."""
    from app.outputs import read_adapter

    result = fed.run_app(run_config | {"output-dir": str(out)})
    # On a loaded machine `flwr run --stream` can stop streaming before the run ends: wait for it.
    deadline = time.monotonic() + run_config["round-timeout"] * (run_config["num-server-rounds"] + 2)
    while not fed.last_run_status().startswith("finished") and time.monotonic() < deadline:
        time.sleep(5)
    if fed.last_run_status() != "finished:completed":
        sys.exit(f"{run_config['aggregation']} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return list(read_adapter(out / "final").values())


def first_round_gap(fedavg: Path, secagg: Path) -> tuple[float, float]:
    """SecAgg+ vs FedAvg on round 1, where both runs aggregate the very same updates (same start, same
    seeds): (largest weight difference, what the app allows). Allowed: each of the k nodes' values
    rounds by under one quantization level (`step`, recorded in the run), the weighted mean divides
    their sum by sum(n)/max_weight, and each run stores the adapter in float32 (half an ulp each).
    Later rounds train from the two slightly different adapters, so their gap is no longer bounded
    by this; what matters there is the held-out loss."""
    from app.outputs import read_adapter

    q = json.loads((secagg / "rounds" / "round-0001" / "metrics.json").read_text())
    a = list(read_adapter(fedavg / "rounds" / "round-0001").values())
    b = list(read_adapter(secagg / "rounds" / "round-0001").values())
    quantization = len(q["aggregated"]) * q["quantization"]["step"] * q["quantization"]["max_weight"] / q["num_examples"]
    float32 = max(float(np.max(np.abs(x))) for x in a) * 2.0**-23
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)), quantization + float32


def federated_choice(out: Path, start: list[np.ndarray], patience: int, max_rounds: int):
    """`early_stop` over the run's own validation losses (metrics.jsonl: round r's adapter as the
    nodes measured it): (round, its adapter, the losses the rule saw, that round's losses by org)."""
    from app.outputs import OutputDir, read_adapter

    rows = sorted((json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()), key=lambda r: r["round"])
    rnd, row, losses = early_stop(((r["heldout_loss"], r) for r in rows), patience, max_rounds)
    arrays = list(read_adapter(OutputDir(out).round_dir(rnd)).values()) if rnd else start
    return rnd, arrays, losses, row["heldout_loss_by_org"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (training noise, "
                        "the validation split, LoRA init); the partition is fixed")
    parser.add_argument("--rounds", type=int, default=20, help="most rounds R of any method")
    parser.add_argument("--patience", type=int, default=3, help="stop after this many rounds without a new best "
                        "validation loss")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps S per organisation and round")
    parser.add_argument("--batch-size", type=int, default=4, help="batch B")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help=f"organisations' folders org-* and their test folders test/org-* ({MAKE_DATA})")
    parser.add_argument("--model", help=f"base model: hub id or diffusers folder (default: {DEFAULT_MODEL}, {MAKE_MODEL})")
    parser.add_argument("--resolution", type=int, help="default: 16 for the digits base, else pyproject's")
    parser.add_argument("--heldout-fraction", type=float, default=0.25, help="each node's validation split")
    parser.add_argument("--eval-timesteps", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps of samples.png (0: none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for alone and pooled (each federation node runs one)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="results.json, samples.png, runs/")
    args = parser.parse_args()

    import logging

    import diffusers
    import torch
    import transformers
    from conftest import load_certs_tool, with_defaults
    from federation import LocalFederation

    from app.pretrain import RESOLUTION

    if args.model is None and not (DEFAULT_MODEL / "model_index.json").is_file():
        sys.exit(f"no base model in {DEFAULT_MODEL}: run `{MAKE_MODEL}` (about 2 min), or give --model")
    data_dir = args.data_dir.resolve()
    orgs = sorted(p.name for p in data_dir.glob("org-*") if p.is_dir()) if data_dir.is_dir() else []
    if len(orgs) < 2:
        hint = f"run `{MAKE_DATA}`" if args.data_dir == DEFAULT_DATA else "give a folder of organisations' folders"
        sys.exit(f"{data_dir} holds {len(orgs)} organisation folder(s) org-*: federating needs 2 or more ({hint})")
    missing = [o for o in orgs if not (data_dir / "test" / o).is_dir()]
    if missing:
        sys.exit(f"{data_dir}/test has no test folder for {', '.join(missing)}: the reported figures come from images no "
                 "node reads; `python -m app.partition ... --test-fraction 0.25` writes them")
    model = args.model or str(DEFAULT_MODEL)
    resolution = args.resolution or (RESOLUTION if args.model is None else None)

    torch.set_num_threads(args.threads)
    # The table is the output: not every training step's log line, nor loading bars.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    args.out = args.out.resolve()  # the ServerApp needs an absolute output-dir
    args.out.mkdir(parents=True, exist_ok=True)
    run_config = {
        "base-model": model, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "batch-size": args.batch_size, "learning-rate": args.learning_rate, "heldout-fraction": args.heldout_fraction,
        "eval-timesteps": args.eval_timesteps, "min-nodes": len(orgs), "sample-every": 0,
        "node-wait-timeout": 120, "round-timeout": 900, **({"resolution": resolution} if resolution else {}),
    }
    trained_labels = {o: set(labels_of(data_dir / o).values()) for o in orgs}
    all_labels = set().union(*trained_labels.values(), *(labels_of(data_dir / "test" / o).values() for o in orgs))
    unseen = {alone(o): all_labels - trained_labels[o] for o in orgs}
    print(f"{len(orgs)} organisations in {data_dir}; model {model}; seeds {', '.join(map(str, args.seeds))}; "
          f"at most {args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size}, learning rate "
          f"{args.learning_rate:g}; early stopping: patience {args.patience} rounds on the validation loss")
    for o in orgs:
        print(f"  {o}: trains on {', '.join(sorted(trained_labels[o])) or 'unlabelled images'}"
              + (f"; never sees {', '.join(sorted(unseen[alone(o)]))}" if unseen[alone(o)] else ""))

    tables, runs_record, checks, seconds = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="fedlora-compare-") as tmp:
        tmp = Path(tmp)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            load_certs_tool().generate(tmp / "certs", [])
        node_config = {o: {"data-dir": str(data_dir / o), "org": o, "cache-dir": str(tmp / f"cache-{o}")} for o in orgs}
        nodes = {o: NodeConfig.from_flower(c) for o, c in node_config.items()}
        cfg0 = RunConfig.from_flower(with_defaults(run_config | {"output-dir": str(tmp / "unused")}))
        t0 = time.perf_counter()
        tests = test_sets(cfg0, {o: data_dir / "test" / o for o in orgs})
        print(f"  test images (never trained on, nor used to stop): "
              f"{', '.join(f'{o} {sum(d.num_heldout for (k, _), d in tests.items() if k == o)}' for o in orgs)}")
        seconds["test encoding"] = time.perf_counter() - t0
        with LocalFederation(tmp / "fed", tmp / "certs", node_config) as fed:
            for seed in args.seeds:
                seed_config = run_config | {"seed": seed}
                cfg = RunConfig.from_flower(with_defaults(seed_config | {"output-dir": str(tmp / "unused")}))
                t0 = time.perf_counter()
                data = org_data(cfg, nodes)  # encodes into the nodes' caches, which the federation then reads
                start = initial_adapter(cfg)
                adapters, chosen = {BASE: start}, {BASE: (0, [])}
                for method, d, steps in [*((alone(o), data[o], args.local_steps) for o in orgs),
                                         (POOLED, pooled_data(data), len(orgs) * args.local_steps)]:
                    rnd, adapters[method], losses = early_stop(
                        rounds_alone(cfg, d, start, steps, method.removeprefix("alone: ") if method != POOLED else "pooled"),
                        args.patience, args.rounds)
                    chosen[method] = (rnd, losses)
                seconds[f"seed {seed}: alone and pooled"] = time.perf_counter() - t0
                runs = args.out / "runs" / f"seed-{seed}"
                for method, mode in ((FEDAVG, "fedavg"), (SECAGG, "secagg+")):
                    # A previous comparison's run is replaced, or the ServerApp would resume it.
                    shutil.rmtree(runs / mode, ignore_errors=True)
                    t0 = time.perf_counter()
                    run_federation(fed, seed_config | {"aggregation": mode}, runs / mode)
                    seconds[f"seed {seed}: {method}"] = time.perf_counter() - t0
                    rnd, adapters[method], losses, by_nodes = federated_choice(runs / mode, start, args.patience, args.rounds)
                    chosen[method] = (rnd, losses)
                    if method == FEDAVG:
                        # The nodes measured the selected adapter themselves: the same figures, or this
                        # benchmark measures something else than the app does.
                        mine = heldout_table(cfg, data, {FEDAVG: adapters[FEDAVG]})[FEDAVG]
                        nodes_gap = max(abs(by_nodes[o] - mine[o]) for o in orgs)
                gap, allowed = first_round_gap(runs / "fedavg", runs / "secagg+")
                checks.append({"seed": seed, "fedavg_round": chosen[FEDAVG][0], "nodes_gap": nodes_gap,
                               "secagg_round_1_gap": gap, "allowed": allowed})
                print(f"seed {seed}: rounds chosen by validation loss: "
                      + ", ".join(f"{m} {r}" for m, (r, _) in chosen.items() if m != BASE)
                      + f"; FedAvg round {chosen[FEDAVG][0]} in-process vs the nodes' own: largest difference "
                        f"{nodes_gap:.1e}; SecAgg+ vs FedAvg round 1 weights {gap:.1e} (allowed {allowed:.1e})")
                if nodes_gap > 1e-4:
                    sys.exit("the in-process measurement disagrees with the nodes': the benchmark is broken")
                if gap > allowed:
                    sys.exit("SecAgg+ and FedAvg aggregated the same round-1 updates beyond the quantization bound")
                t0 = time.perf_counter()
                tables.append(test_table(cfg, tests, adapters, unseen))
                seconds[f"seed {seed}: testing"] = time.perf_counter() - t0
                print(f"seed {seed}: union test loss: " + ", ".join(f"{m} {row[UNION]:.4f}" for m, row in tables[-1].items()))
                runs_record.append({"seed": seed, "rounds_chosen": {m: r for m, (r, _) in chosen.items()},
                                    "validation_losses": {m: v for m, (_, v) in chosen.items()},
                                    "test_loss": tables[-1]})
                if seed == args.seeds[0] and args.sample_steps:
                    labels = sorted(all_labels)
                    sample_sheet(cfg, adapters, [f"a handwritten digit {lab}" for lab in labels] if labels else
                                 list(cfg.sample_prompts), args.out / "samples.png")

    summary = mean_std(tables)
    columns = [UNION, *orgs, *sorted(c for c in tables[0][BASE] if c.startswith("digit ")), "unseen"]
    print(f"\ntest loss (noise-prediction MSE on images no node read; lower is better), mean ± std over "
          f"{len(args.seeds)} seed(s); \"unseen\": the digits that organisation never trained on")
    print(format_table(summary, columns))
    verdicts = expectations(summary, orgs)
    print()
    for e in verdicts:
        print(f"{'holds' if e.holds else 'DOES NOT HOLD'}: {e.text} ({e.detail})")
    seconds["total"] = time.perf_counter() - t_start
    (args.out / "results.json").write_text(json.dumps({
        "run_config": run_config, "seeds": args.seeds, "patience": args.patience, "data_dir": str(data_dir),
        "test_loss_mean_std": summary, "expectations": [vars(e) for e in verdicts], "runs": runs_record,
        "checks": checks, "seconds": seconds}, indent=2) + "\n")
    print(f"wall time {seconds['total']:.0f} s; wrote {args.out / 'results.json'}"
          + (f" and {args.out / 'samples.png'}" if args.sample_steps else ""))


if __name__ == "__main__":
    main()
