"""Six organisations complete every SecAgg+ round on loopback, measured as `make bench-scale` measures
N = 3, 10 and 20 (tests/benchmark_scale.py; its figures live in docs/performance.md, not here)."""

from __future__ import annotations

import pytest

import benchmark_scale


@pytest.mark.federation
def test_six_organisations_complete_every_secagg_round_and_the_benchmark_attributes_their_costs():
    (row,) = benchmark_scale.measure(6, rounds=2, local_steps=2, modes=["secagg+"])
    print(benchmark_scale.HEADER)
    benchmark_scale.print_row(row)
    # Every round aggregated every organisation's masked update.
    assert row["rounds"] == "2/2" and row["fewest_aggregated"] == 6
    # Each party was found and charged: the coordinator's two processes and each node's tree,
    # warm trainer included (it alone holds the model: well over 100 MiB).
    assert row["superlink_cpu_s"] > 0 and row["serverapp_cpu_s"] > 0 and row["nodes_cpu_s"] > 0
    assert row["superlink_gib"] > 0.05 and row["serverapp_gib"] > 0.05 and row["node_gib"] > 0.1
