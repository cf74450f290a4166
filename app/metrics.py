"""Prometheus metrics from the ClientApp and ServerApp, which live one message (or one run) long.

Metrics go through prometheus_client's multiprocess mode into $PROMETHEUS_MULTIPROC_DIR, which
the node's long-lived exporter (docker/metrics_exporter.py) serves. prometheus_client names
files by process id, so every short-lived process would leave files behind (1 MiB each) and
counters would restart from zero in each; instead each process claims a reusable slot under a
lock: consecutive processes write to the same files, so counters continue from the stored value
and stay monotonic across processes and node restarts, and only concurrent processes get a
second slot. Without $PROMETHEUS_MULTIPROC_DIR, or where it cannot be written, the metrics just
stay in the process.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import os
from logging import WARNING
from pathlib import Path
from types import SimpleNamespace

from flwr.common.logger import log
from prometheus_client import Counter, Gauge, Histogram, values

_held_locks: list = []


def _claim_slot(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        lock = open(directory / f"slot-{slot}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _held_locks.append(lock)  # released by the OS when this process exits
        return f"slot{slot}"
    raise AssertionError("unreachable")


# Room for the metric files (a few sparse 1 MiB mmaps): on a fuller volume a write through the
# mmap would crash the process (SIGBUS), not raise.
_MIN_FREE_BYTES = 16 * 2**20


def _use_directory(directory: Path) -> None:
    """Share metrics through `directory`, or keep them in this process if it cannot take them.

    Metrics must never stop training: a read-only, broken or full volume costs the exporter its
    view of this process, with one warning, and nothing else."""
    try:
        identity = _claim_slot(directory)
        free = os.statvfs(directory)
        if free.f_bavail * free.f_frsize < _MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, "less than 16 MiB free")
    except OSError as err:
        log(WARNING, "cannot write metrics to PROMETHEUS_MULTIPROC_DIR=%s (%s): metrics stay in this process, "
            "unseen by the node's exporter; give the node a writable metrics volume", directory, err)
        # prometheus_client chose multiprocess values itself, from the same variable.
        values.ValueClass = values.MutexValue
        return
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: identity)


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _use_directory(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    # "mostrecent": the last value set by any process, kept after that process exits.
    return Gauge(name, documentation, labels, multiprocess_mode="mostrecent")


# --- An organisation's node (ClientApp) ---------------------------------------------------------
TRAIN_STEPS = Counter("fedlora_train_steps", "Local optimizer steps.", ["org"])
TRAIN_EXAMPLES = Counter("fedlora_train_examples", "Images trained on (steps x batch size).", ["org"])
ROUNDS_TRAINED = Counter("fedlora_rounds_trained", "Rounds this node trained in.", ["org"])
TRAIN_LOSS = _gauge("fedlora_train_loss", "Mean local training loss of the node's last round.", ("org",))
HELDOUT_LOSS = _gauge("fedlora_heldout_loss", "Held-out loss of the last global adapter the node received.", ("org",))
STEP_SECONDS = Histogram("fedlora_train_step_seconds", "Time per local training step.", ["org"],
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
IMAGES_PER_SECOND = _gauge("fedlora_train_images_per_second", "Training throughput in the node's last round.", ("org",))
ACCEL_MEMORY_PEAK = _gauge("fedlora_accelerator_memory_peak_bytes", "Peak GPU memory in the node's last round.", ("org",))
IMAGES_SKIPPED = _gauge("fedlora_images_skipped", "Unreadable images skipped in the node's data.", ("org",))
LAST_ROUND = _gauge("fedlora_last_round_timestamp_seconds", "Unix time the node finished its last round.", ("org",))
SENT_BYTES = Counter("fedlora_sent_bytes", "Update bytes the node sent (int64 under SecAgg+, float32 plain).", ["org"])

# --- The coordinator (ServerApp) ----------------------------------------------------------------
# Unlabelled metrics exist as soon as they are created: only the ServerApp creates these, so
# that nodes' endpoints carry no coordinator series.
@functools.cache
def server() -> SimpleNamespace:
    return SimpleNamespace(
        run_active=_gauge("fedlora_run_active", "1 while a run is in progress."),
        round_current=_gauge("fedlora_round_current", "The round in progress, or the last one."),
        rounds_completed=Counter("fedlora_rounds_completed", "Rounds aggregated and checkpointed."),
        round_seconds=Histogram("fedlora_round_duration_seconds", "Wall time of a round.",
                                buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)),
        phase_seconds=Counter("fedlora_round_phase_seconds", "Round time by phase: the slowest node's compute, "
                              "or everything else (messaging, waiting, aggregation).", ["phase"]),
        nodes=_gauge("fedlora_round_nodes", "Nodes in the last round by state.", ("state",)),
        train_loss=_gauge("fedlora_federated_train_loss", "Training loss of the last round, weighted over nodes."),
        heldout_loss=_gauge("fedlora_federated_heldout_loss", "Held-out loss of the newest measured adapter."),
        update_norm=_gauge("fedlora_global_update_norm", "L2 norm of the last aggregated update."),
        received_bytes=Counter("fedlora_received_bytes", "Update bytes received from nodes."),
    )


# --- The coordinator's view of each organisation (ServerApp) ---------------------------------------
# An organisation on a remote host has an exporter the coordinator cannot scrape; these series are
# what the ServerApp itself learned. Participation always; figures only from organisations whose
# figures reached it in plain (org-metrics="shared"), and they keep the last value revealed.
@functools.cache
def org_view() -> SimpleNamespace:
    return SimpleNamespace(
        rounds_aggregated=Counter("fedlora_org_rounds_aggregated", "Rounds whose aggregate included the "
                                  "organisation's update.", ["org"]),
        rounds_failed=Counter("fedlora_org_rounds_failed", "Rounds the organisation was sampled for but "
                              "not aggregated in (it failed or dropped out).", ["org"]),
        refused=Counter("fedlora_org_refused", "Nodes of the organisation the coordinator refused for the rest of "
                        "a run: a malformed or inconsistent reply, or a registration that names no one organisation "
                        "(the reason is in the ServerApp log and metrics.jsonl).", ["org"]),
        last_round=_gauge("fedlora_org_last_round_timestamp_seconds", "Unix time of the last round that "
                          "aggregated the organisation's update.", ("org",)),
        train_loss=_gauge("fedlora_org_train_loss", "The organisation's train loss in its last round, as "
                          "revealed to the coordinator.", ("org",)),
        heldout_loss=_gauge("fedlora_org_heldout_loss", "The organisation's held-out loss of the newest "
                            "measured adapter, as revealed to the coordinator.", ("org",)),
        images_per_second=_gauge("fedlora_org_train_images_per_second", "The organisation's training "
                                 "throughput in its last round, as revealed to the coordinator.", ("org",)),
        images_skipped=_gauge("fedlora_org_images_skipped", "Unreadable images the organisation skipped, as "
                              "revealed to the coordinator.", ("org",)),
        train_images=_gauge("fedlora_org_train_images", "The organisation's training images (its weight in "
                            "FedAvg), as revealed to the coordinator.", ("org",)),
    )


def update_bytes(num_elements: int, secure: bool) -> int:
    """What one update weighs on the wire: SecAgg+ masks each value into an int64."""
    return num_elements * (8 if secure else 4)
