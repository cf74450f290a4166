"""What the coordinator learns from a round, and what it writes down: logs, metrics.jsonl, Prometheus.

org-metrics="shared": every node's figures arrive in plain (its fit and evaluate replies); the
federated figures are weighted means of them, and the per-organisation ones are kept too.
org-metrics="private": only federation-wide sums arrive, unmasked from the SecAgg+ vector
(app/secagg.py's private_sums); nothing here is keyed by organisation except participation, which
the coordinator sees anyway (who replied to which message). A total is written down only while no
organisation's own figure follows from it and the totals already recorded over other sets of
organisations (`private_round`, `private_heldout_record`): when participation changes, the total
over {A, B, C} minus the total over {A, B} is C's figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import metrics

# A round's federation-wide figures over the organisations it aggregated; a held-out figure's over
# the organisations that measured it (heldout_orgs).
ROUND_TOTALS = ("num_examples", "train_loss", "skipped_images", "client_seconds_mean")
HELDOUT_TOTALS = ("heldout_loss", "num_heldout")


def weighted(values: list[tuple[float, int]]) -> float:
    return float(sum(v * n for v, n in values) / sum(n for _, n in values))


def shared_heldout(by_org: dict[str, dict]) -> dict[str, Any]:
    """Held-out loss of one adapter, weighted by each node's held-out images.

    `heldout_orgs`: the organisations it covers. The nodes that measure round r's adapter are round
    r+1's participants, so when organisations join or drop the figure changes meaning; outputs.py
    compares only figures over the same organisations."""
    return {
        "heldout_loss": weighted([(m["heldout_loss"], m["num_heldout"]) for m in by_org.values()]),
        "num_heldout": sum(int(m["num_heldout"]) for m in by_org.values()),
        "heldout_orgs": sorted(by_org),
        "heldout_loss_by_org": {o: m["heldout_loss"] for o, m in by_org.items()},
        "client_eval_seconds": {o: m["eval_seconds"] for o, m in by_org.items()},
    }


def private_heldout(federated: dict[str, Any], orgs: list[str]) -> dict[str, Any]:
    """`orgs`: who took part in the measurement, which the coordinator knows in any mode."""
    return {"heldout_loss": federated["heldout_loss"], "num_heldout": federated["num_heldout"],
            "heldout_orgs": sorted(orgs)}


def shared_figures(by_org: dict[str, dict]) -> dict[str, Any]:
    """The federation-wide figures of a fit stage, from each node's plain report."""
    return {
        "num_examples": sum(m["num_examples"] for m in by_org.values()),
        "train_loss": weighted([(m["train_loss"], m["num_examples"]) for m in by_org.values()]),
        "skipped_images": sum(int(m["skipped_images"]) for m in by_org.values()),
    }


def round_record(rnd: int, aggregation: str, org_metrics: str, participants: list[str], fit: dict[str, Any],
                 seconds: dict[str, float]) -> dict[str, Any]:
    """The round's line in metrics.jsonl. Under org-metrics="private" it holds no per-organisation
    figure: only who took part, the weights' fingerprints (a hash of what the coordinator sent), and
    federation-wide figures."""
    federated, by_org = fit["federated"], fit["by_org"]
    record = {
        "round": rnd, "aggregation": aggregation, "org_metrics": org_metrics, "participants": participants,
        "aggregated": fit["orgs"],
        # Failed or went offline mid-round: SecAgg+ unmasked the sum without them.
        "dropped": sorted(set(participants) - set(fit["orgs"])),
        "num_examples": federated["num_examples"], "update_norm": fit["update_norm"],
        "train_loss": federated["train_loss"],
        "heldout_loss": None,  # measured by the nodes that receive this adapter next
        "received_fingerprints": fit["fingerprints"],
        "skipped_images": federated["skipped_images"],
        "seconds": seconds,
    }
    if by_org is None:
        record["client_seconds_mean"] = {"fit": federated["fit_seconds_mean"]}
        return record
    # The stage that carries the fit waits for the slowest node's; the other stages carry no compute
    # a node reports (SecAgg+'s key exchange and unmasking take milliseconds on a node).
    fit_stage = "collect_masked_vectors" if aggregation == "secagg+" else "train"
    record["stage_compute_seconds"] = {fit_stage: max(m["fit_seconds"] for m in by_org.values())}
    return record | {
        "train_loss_by_org": {o: m["train_loss"] for o, m in by_org.items()},
        "num_examples_by_org": {o: m["num_examples"] for o, m in by_org.items()},
        "skipped_images_by_org": {o: m["skipped_images"] for o, m in by_org.items()},
        "images_per_second_by_org": {o: m["images_per_second"] for o, m in by_org.items()},
        "client_seconds": {o: {"fit": m["fit_seconds"], "train": m["train_seconds"]} for o, m in by_org.items()},
    }


def revealed_by(covered: list[list[str]]) -> list[str]:
    """Organisations whose own figure follows from totals over these sets of organisations: those
    whose indicator lies in the span of the sets' indicators (differences, and any other linear
    combination of the totals)."""
    orgs = sorted(set().union(*map(set, covered)))
    if not orgs:
        return []
    rows = np.array([[org in group for org in orgs] for group in covered], dtype=float)
    rank = np.linalg.matrix_rank(rows)
    return [org for i, org in enumerate(orgs)
            if np.linalg.matrix_rank(np.vstack([rows, np.eye(len(orgs))[i]])) == rank]


def private_round(record: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """org-metrics="private": the round record without its totals where, with the totals of earlier
    records (`history`, the output directory's), they would reveal one organisation's figure. Then
    the precision figures go too (they are computed from the totals), and `withheld` names what went."""
    covered = [m["aggregated"] for m in history if m.get("num_examples") is not None and m["round"] != record["round"]]
    revealed = revealed_by(covered + [record["aggregated"]])
    earlier = next((m for m in history if m["round"] == record["round"] - 1), {})
    errors = dict(record.get("private_errors", {}))
    if earlier.get("heldout_withheld"):  # this round measured that held-out figure; its error names the count
        errors.pop("heldout_loss", None)
    if revealed:
        record = {k: v for k, v in record.items() if k not in ROUND_TOTALS}
        record["withheld"] = {"figures": list(ROUND_TOTALS), "would_reveal": revealed}
        errors = {k: v for k, v in errors.items() if k == "images"}  # depends on the node count only
    if "private_errors" in record:
        record["private_errors"] = errors
    return record


def private_heldout_record(rnd: int, heldout: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The same for a held-out figure (adapter `rnd`'s) under org-metrics="private"; shared figures
    (keyed by organisation) pass unchanged."""
    if "heldout_loss_by_org" in heldout:
        return heldout
    covered = [m["heldout_orgs"] for m in history
               if m.get("heldout_loss") is not None and m.get("heldout_orgs") and m["round"] != rnd]
    revealed = revealed_by(covered + [heldout["heldout_orgs"]])
    if not revealed:
        return heldout
    return {"heldout_orgs": heldout["heldout_orgs"],
            "heldout_withheld": {"figures": list(HELDOUT_TOTALS), "would_reveal": revealed}}


def final_evaluate_record(seconds: float, stages: dict[str, float], heldout: dict[str, Any]) -> dict[str, Any]:
    """The final evaluate stage's timing: its wall time, each message stage's, and the slowest node's
    compute where nodes report it (org-metrics="shared")."""
    record: dict[str, Any] = {"seconds": seconds, "stages": stages}
    if "client_eval_seconds" in heldout:
        record["compute_seconds"] = max(heldout["client_eval_seconds"].values())
    return record


def export_round(record: dict[str, Any], online: int, received_bytes: int) -> None:
    """Prometheus, from the coordinator's view of one round."""
    gauges = metrics.server()
    if "client_seconds" in record:  # the slowest node gates the round
        client = max(s["fit"] for s in record["client_seconds"].values())
    else:  # org-metrics="private": only the mean node's compute is known, unless withheld
        client = record.get("client_seconds_mean", {}).get("fit")
    gauges.rounds_completed.inc()
    gauges.round_seconds.observe(record["seconds"]["round"])
    if client is not None:
        gauges.phase_seconds.labels("client_compute").inc(client)
        gauges.phase_seconds.labels("other").inc(max(0.0, record["seconds"]["round"] - client))
    sampled, responded = len(record["participants"]), len(record["aggregated"])
    for state, n in [("online", online), ("sampled", sampled), ("responded", responded),
                     ("dropped", sampled - responded)]:
        gauges.nodes.labels(state).set(n)
    if record.get("train_loss") is not None:
        gauges.train_loss.set(record["train_loss"])
    gauges.update_norm.set(record["update_norm"])
    gauges.received_bytes.inc(received_bytes)

    # Participation is what the coordinator sees in any mode: who answered this round's messages.
    orgs = metrics.org_view()
    for org in record["participants"]:
        # Both series exist from an organisation's first round on: 0 is a value, absent is not.
        orgs.rounds_aggregated.labels(org)
        orgs.rounds_failed.labels(org)
        if org in record["aggregated"]:
            orgs.rounds_aggregated.labels(org).inc()
            orgs.last_round.labels(org).set_to_current_time()
        else:
            orgs.rounds_failed.labels(org).inc()
    # Figures only for organisations that revealed them (org-metrics="shared").
    for org, value in record.get("train_loss_by_org", {}).items():
        orgs.train_loss.labels(org).set(value)
    for org, value in record.get("num_examples_by_org", {}).items():
        orgs.train_images.labels(org).set(value)
    for org, value in record.get("images_per_second_by_org", {}).items():
        orgs.images_per_second.labels(org).set(value)
    for org, value in record.get("skipped_images_by_org", {}).items():
        orgs.images_skipped.labels(org).set(value)


def export_heldout(heldout: dict[str, Any]) -> None:
    if "heldout_loss" not in heldout:  # withheld (org-metrics="private")
        return
    metrics.server().heldout_loss.set(heldout["heldout_loss"])
    orgs = metrics.org_view()
    for org, value in heldout.get("heldout_loss_by_org", {}).items():
        orgs.heldout_loss.labels(org).set(value)


def heldout_log_line(rnd: int, heldout: dict[str, Any]) -> tuple:
    """The log line for one adapter's held-out loss: per organisation only where they were revealed."""
    if "heldout_loss" not in heldout:
        return ("round %d adapter: held-out loss withheld: with the figures already recorded it would reveal %s's "
                "own (participation changed)", rnd, ", ".join(heldout["heldout_withheld"]["would_reveal"]))
    by_org = heldout.get("heldout_loss_by_org")
    detail = ", ".join(f"{o} {v:.5f}" for o, v in sorted(by_org.items())) if by_org else \
        f"{heldout['num_heldout']} held-out images; per-organisation losses stay private"
    return "round %d adapter: held-out loss %.5f (%s)", rnd, heldout["heldout_loss"], detail
