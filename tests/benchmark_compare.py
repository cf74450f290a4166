"""Does federating pay? Held-out loss of every way the same organisations could train.

    make compare          (or: python tests/benchmark_compare.py --rounds 3 --local-steps 30)

On the same organisations' folders (default: the offline demo data, where each organisation draws
a different shape, so the data is non-IID) and the same training budget, it trains:

- base model:   nothing (the LoRA adapter starts at zero: it is the base model);
- alone: ORG:   one organisation on its own images, R rounds x S steps, exactly as a node trains in
                a federation of one (training.local_update: the received adapter, a fresh Adam
                optimizer each round, the node's per-round seed), keeping its own adapter;
- FedAvg:       the real loopback federation (TLS SuperLink, one SuperNode per organisation with a
                registered key, `flwr run`), aggregation="fedavg": R rounds, S steps per node;
- SecAgg+:      the same federation with aggregation="secagg+";
- pooled:       for reference only, one holder of every organisation's training images (as if they
                had been shared), R rounds of N x S steps: the federation's total compute.

Each organisation spends R x S steps of batch B in "alone", FedAvg and SecAgg+ alike; pooled spends
what all N spend together. Every final adapter is then measured in this process with the app's own
held-out evaluation (model.LoraUNet.heldout_loss: noise-prediction MSE on a fixed timestep grid with
fixed noise) on each organisation's held-out images, split by the app's own per-image rule
(data.split), so every method sees exactly the same held-out images; "union" is the mean over all
of them (each organisation's loss weighted by its held-out images, as the ServerApp reports it).

It prints a table, checks the in-process measurement of the FedAvg adapter against what the nodes
themselves measured during the run, compares SecAgg+ with FedAvg on round 1 (the same updates, so
only aggregation differs) against the quantization step the run recorded, and writes results.json,
compare.png (matplotlib, the `test` extra) and the two runs' own outputs (runs/fedavg, runs/secagg+:
metrics.jsonl, losses.png, adapters) to --out.

Why "alone" is what it is: joining the federation costs an organisation R x S steps of its own
compute, so that is what it would spend alone. Pooled is a ceiling, not an option: it needs the
images in one place, and it spends N times the steps of any single organisation.
"""

from __future__ import annotations

import argparse
import contextlib
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


def train_rounds(cfg: RunConfig, data, start: list[np.ndarray], rounds: int, steps: int, org: str) -> list[np.ndarray]:
    """What a node computes in `rounds` rounds of a federation of one: each round it loads the
    adapter it holds, trains `steps` steps with a fresh optimizer and the node's seed for that round
    (training.local_update), and keeps the result."""
    from app import model

    net = model.LoraUNet.load(cfg)
    arrays = start
    for rnd in range(1, rounds + 1):
        model.load_lora(net.unet, net.names, arrays)
        net.train(data, steps, cfg.batch_size, cfg.learning_rate, round_seed(cfg.seed, rnd, org))
        arrays = list(model.lora_state(net.unet).values())
    return arrays


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


@dataclass
class Verdict:
    federated_beats_alone: bool
    best_alone: str
    secagg_minus_fedavg: float
    pooled_is_ceiling: bool


def verdict(table: dict[str, dict[str, float]], orgs: list[str]) -> Verdict:
    best = min((alone(o) for o in orgs), key=lambda m: table[m][UNION])
    federated = max(table[FEDAVG][UNION], table[SECAGG][UNION])
    return Verdict(
        federated_beats_alone=federated < table[best][UNION], best_alone=best,
        secagg_minus_fedavg=table[SECAGG][UNION] - table[FEDAVG][UNION],
        pooled_is_ceiling=all(table[POOLED][UNION] <= row[UNION] for m, row in table.items() if m != POOLED),
    )


def format_table(table: dict[str, dict[str, float]], columns: list[str]) -> str:
    width = max(len(m) for m in table)
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    lines += [f"{m:<{width}}  " + "  ".join(f"{row[c]:>8.5f}" for c in columns) for m, row in table.items()]
    return "\n".join(lines)


def plot(table: dict[str, dict[str, float]], columns: list[str], title: str, path: Path) -> None:
    """Grouped bars: one group per held-out set, one bar per method, the y axis around the data
    (the differences are a few percent of the loss)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    methods = list(table)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(columns), 4.2))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, [table[method][c] for c in columns], width, label=method, color=colours(i % 10))
    values = [row[c] for row in table.values() for c in columns]
    pad = (max(values) - min(values)) * 0.15 or 0.01
    ax.set_ylim(min(values) - pad, max(values) + pad)
    ax.set_xticks(range(len(columns)), [f"held-out\n{c}" for c in columns])
    ax.set_ylabel("held-out loss (noise-prediction MSE)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def nodes_measured(out: Path) -> dict[str, float]:
    """The final adapter's held-out loss per organisation, as the nodes measured it in the run."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["heldout_loss_by_org"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds R")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps S per organisation and round")
    parser.add_argument("--batch-size", type=int, default=4, help="batch B")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--orgs", type=int, default=3, help="demo organisations to write (without --data-dir)")
    parser.add_argument("--images", type=int, default=24, help="images per demo organisation (without --data-dir)")
    parser.add_argument("--data-dir", type=Path, help="a folder of organisations' folders org-* (default: demo data)")
    parser.add_argument("--model", help="base model: hub id or diffusers folder (default: the offline tiny model)")
    parser.add_argument("--resolution", type=int, help="default: 32 for the tiny model, else pyproject's")
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    parser.add_argument("--eval-timesteps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for alone and pooled (each federation node runs one)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="results.json, compare.png")
    args = parser.parse_args()

    import logging

    import diffusers
    import torch
    import transformers
    from conftest import load_certs_tool, with_defaults
    from federation import LocalFederation

    from app.offline import TINY_MODEL_RESOLUTION, write_demo_data, write_tiny_model

    torch.set_num_threads(args.threads)
    # The table is the output: not every training step's log line, nor loading bars.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    args.out = args.out.resolve()  # the ServerApp needs an absolute output-dir
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-compare-") as tmp:
        tmp = Path(tmp)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            model = args.model or str(write_tiny_model(tmp / "tiny-sd"))
            data_dir = args.data_dir or write_demo_data(tmp / "data", orgs=args.orgs, images_per_org=args.images)[0].parent
            load_certs_tool().generate(tmp / "certs", [])
        orgs = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and p.name.startswith("org-"))
        if len(orgs) < 2:
            sys.exit(f"{data_dir} holds {len(orgs)} organisation folder(s) org-*: federating needs 2 or more")
        resolution = args.resolution or (TINY_MODEL_RESOLUTION if not args.model else None)
        run_config = {
            "base-model": model, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "batch-size": args.batch_size, "learning-rate": args.learning_rate, "heldout-fraction": args.heldout_fraction,
            "eval-timesteps": args.eval_timesteps, "min-nodes": len(orgs), "sample-every": 0,
            "node-wait-timeout": 120, "round-timeout": 900, **({"resolution": resolution} if resolution else {}),
        }
        cfg = RunConfig.from_flower(with_defaults(run_config | {"output-dir": str(tmp / "unused")}))
        node_config = {o: {"data-dir": str(data_dir / o), "org": o, "cache-dir": str(tmp / f"cache-{o}")} for o in orgs}
        nodes = {o: NodeConfig.from_flower(c) for o, c in node_config.items()}
        budget = f"{args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size}"
        print(f"{len(orgs)} organisations in {data_dir}; model {model} at {cfg.resolution} px; {budget}; "
              f"learning rate {args.learning_rate:g}")

        t0 = time.perf_counter()
        data = org_data(cfg, nodes)  # encodes into the nodes' caches, which the federation then reads
        for org, d in data.items():
            print(f"  {org}: {d.num_train} training images, {d.num_heldout} held out")
        start = initial_adapter(cfg)
        adapters = {BASE: start}
        for org in orgs:
            adapters[alone(org)] = train_rounds(cfg, data[org], start, args.rounds, args.local_steps, org)
            print(f"  {alone(org)}: {args.rounds} rounds trained")
        adapters[POOLED] = train_rounds(cfg, pooled_data(data), start, args.rounds, len(orgs) * args.local_steps,
                                        "pooled")
        seconds = {"alone and pooled": time.perf_counter() - t0}
        print(f"  {POOLED}: {args.rounds} rounds x {len(orgs) * args.local_steps} steps trained "
              f"(alone and pooled: {seconds['alone and pooled']:.0f} s)")

        # Each run's own outputs (metrics.jsonl, losses.png, adapters) stay beside the results; a
        # previous comparison's are replaced, or the ServerApp would resume them.
        runs = args.out / "runs"
        for mode in ("fedavg", "secagg+"):
            shutil.rmtree(runs / mode, ignore_errors=True)
        with LocalFederation(tmp / "fed", tmp / "certs", node_config) as fed:
            for method, mode in ((FEDAVG, "fedavg"), (SECAGG, "secagg+")):
                t0 = time.perf_counter()
                adapters[method] = run_federation(fed, run_config | {"aggregation": mode}, runs / mode)
                seconds[method] = time.perf_counter() - t0
                print(f"  {method}: {args.rounds} rounds in {seconds[method]:.0f} s")

        t0 = time.perf_counter()
        table = heldout_table(cfg, data, adapters)
        seconds["measuring"] = time.perf_counter() - t0
        columns = [*orgs, UNION]
        print(f"\nheld-out loss (noise-prediction MSE; lower is better) after {budget}; "
              f"held-out images: {', '.join(f'{o} {d.num_heldout}' for o, d in data.items())}")
        print(format_table(table, columns))

        # The nodes measured the FedAvg run's final adapter themselves (its evaluate stage): the same
        # figures, or this benchmark measures something else than the app does.
        by_nodes = nodes_measured(runs / "fedavg")
        gap = max(abs(by_nodes[o] - table[FEDAVG][o]) for o in orgs)
        print(f"\nFedAvg's final adapter as its nodes measured it in the run: "
              f"{', '.join(f'{o} {by_nodes[o]:.5f}' for o in orgs)} (largest difference {gap:.1e})")
        if gap > 1e-4:
            sys.exit("the in-process measurement disagrees with the nodes': the benchmark is broken")

        v = verdict(table, orgs)
        gap, allowed = first_round_gap(runs / "fedavg", runs / "secagg+")
        print(f"SecAgg+ - FedAvg: union held-out loss {v.secagg_minus_fedavg:+.1e}; round 1, the same updates "
              f"aggregated: largest adapter weight difference {gap:.1e}, allowed {allowed:.1e} (quantization "
              f"+ float32 rounding)")
        print(f"federated beats every organisation alone on the union: {'yes' if v.federated_beats_alone else 'NO'} "
              f"(FedAvg {table[FEDAVG][UNION]:.5f}, SecAgg+ {table[SECAGG][UNION]:.5f}, best "
              f"{v.best_alone} {table[v.best_alone][UNION]:.5f})")
        print(f"pooled is the ceiling (lowest union loss): {'yes' if v.pooled_is_ceiling else 'NO'} "
              f"({table[POOLED][UNION]:.5f})")

    seconds["total"] = time.perf_counter() - t_start
    plot(table, columns, f"{len(orgs)} organisations, {budget}; pooled: {len(orgs)}x the steps per round",
         args.out / "compare.png")
    (args.out / "results.json").write_text(json.dumps({
        "run_config": run_config, "organisations": {o: {"train": d.num_train, "heldout": d.num_heldout}
                                                   for o, d in data.items()},
        "heldout_loss": table, "secagg_minus_fedavg_round_1_weights": gap, "allowed_round_1": allowed,
        "verdict": vars(v), "seconds": seconds}, indent=2) + "\n")
    print(f"wall time {seconds['total']:.0f} s ({', '.join(f'{k} {s:.0f} s' for k, s in seconds.items() if k != 'total')}); "
          f"wrote {args.out / 'results.json'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()
