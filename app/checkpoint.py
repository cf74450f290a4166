"""What the coordinator keeps of an accepted round: the checkpoint (adapter, metrics, samples, via
app/outputs.py), metrics.jsonl, Prometheus and the log.

The last line of defence for the checkpoint: an adapter that is not finite is never written, whatever
the aggregation mode let through (app/aggregate.py checks every aggregate before it is applied), so a
resumed run never starts from one.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from . import metrics, reporting
from .admission import RunFailed
from .config import RunConfig
from .outputs import OutputDir
from .secagg import QuantizationSettings


class Recorder:
    def __init__(self, cfg: RunConfig, out: OutputDir) -> None:
        self.cfg, self.out = cfg, out
        self.names: list[str] = []  # the adapter's PEFT names, in the order of the global arrays

    def round_record(self, rnd: int, participants: list[str], fit: dict[str, Any], seconds: dict[str, Any],
                     quant: QuantizationSettings | None, refused: dict[str, str]) -> dict[str, Any]:
        record = reporting.round_record(rnd, self.cfg.aggregation, self.cfg.org_metrics, participants, fit, seconds)
        # Every node refused so far in this run, by organisation: why (app/admission.py). A node refused
        # in this round also shows in "dropped", like a node that died.
        record["refused"] = refused
        if self.cfg.org_metrics == "private":
            # Worst-case errors of this round's federated figures (app/secagg.py, private_errors).
            record["private_errors"] = quant.private_errors(
                len(fit["orgs"]), self.cfg.max_images_per_node, record["num_examples"], fit["heldout"]["num_heldout"])
            record = reporting.private_round(record, self.out.history())
        return record

    def checkpoint(self, rnd: int, record: dict[str, Any], arrays: list[np.ndarray], sampler, samples_now: bool,
                   round_started: float | None = None) -> None:
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise RunFailed(f"round {rnd}: the adapter holds values that are not finite; it was not saved. The last "
                            f"good adapter is in {self.out.round_dir(rnd - 1)}.")
        t0 = time.perf_counter()
        samples = sampler.grid(arrays if rnd else None) if samples_now else None
        record["seconds"]["samples"] = time.perf_counter() - t0
        if round_started is not None:
            record["seconds"]["round"] = time.perf_counter() - round_started
        path = self.out.write_round(rnd, record, dict(zip(self.names, arrays)), samples)
        log(INFO, "round %d saved to %s%s", rnd, path,
            f" (train loss {record['train_loss']:.5f})" if "train_loss" in record else "")

    def export_round(self, record: dict[str, Any], arrays: list[np.ndarray], online: int) -> None:
        size = sum(a.size for a in arrays)
        reporting.export_round(record, online=online, received_bytes=len(record["aggregated"]) * metrics.update_bytes(
            size, self.cfg.aggregation == "secagg+"))

    def record_heldout(self, rnd: int, heldout: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        heldout = reporting.private_heldout_record(rnd, heldout, self.out.history())
        reporting.export_heldout(heldout)
        self.out.update_round_metrics(rnd, heldout | ({"final_evaluate": final} if final else {}))
        log(INFO, *reporting.heldout_log_line(rnd, heldout))
