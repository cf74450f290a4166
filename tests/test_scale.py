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


def test_a_window_charges_only_the_cpu_spent_inside_it(tmp_path):
    """The SuperLink's idle load is what its process spends during the window, not since it started:
    a process that worked before the Meter started and then sleeps is charged nothing."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    ready = tmp_path / "ready"
    busy_then_idle = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
                      f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", busy_then_idle])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the busy process never finished its work"
            time.sleep(0.05)
        with benchmark_scale.Meter(SimpleNamespace(procs={"superlink": proc}, nodes={})) as meter:
            start = time.monotonic()
            time.sleep(1.0)
            spent = meter.cpu_seconds(start, time.monotonic())[benchmark_scale.SUPERLINK]
        assert spent < 0.3, f"charged {spent:.2f} CPU s to a second in which the process slept"
    finally:
        proc.kill()
        proc.wait()
