"""docker/run_status.py: `make run` reports how *its* run ended, not whichever run is newest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = [  # ours completed; someone else's run, submitted just after, failed
    {"run-id": "111", "status": "finished:completed", "pending-at": "2025-01-01 10:00:00Z"},
    {"run-id": "222", "status": "finished:failed", "pending-at": "2025-01-01 10:00:05Z"},
]


def _fake_flwr(tmp_path: Path) -> Path:
    """Answers `flwr ls CONNECTION --format json [--run-id ID]` like Flower 1.41 does."""
    flwr = tmp_path / "flwr"
    flwr.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
assert args[:2] == ["ls", "remote-federation"] and "--format" in args, args
runs = {RUNS!r}
if "--run-id" in args:
    runs = [r for r in runs if r["run-id"] == args[args.index("--run-id") + 1]]
print(json.dumps({{"success": True, "runs": runs}}, indent=2))
""")
    flwr.chmod(0o755)
    return flwr


def _status(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "docker" / "run_status.py"), str(_fake_flwr(tmp_path)),
                           "remote-federation", *args], capture_output=True, text=True)


def test_reports_the_given_run_not_the_newest(tmp_path):
    ours = _status(tmp_path, "111")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == "run 111: finished:completed\n"
    theirs = _status(tmp_path, "222")
    assert theirs.returncode != 0 and "run 222 did not complete" in theirs.stderr and "flwr log 222" in theirs.stderr


def test_reads_the_run_id_from_flwr_run_json_output():
    # What `flwr run . remote-federation --format json` prints (Flower 1.41): the id, or the error.
    def run_id(printed: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "docker" / "run_status.py"), "--run-id"],
                              input=json.dumps(printed, indent=2), capture_output=True, text=True)

    started = run_id({"success": True, "run-id": "111", "federation-id": "", "fab-id": "fedlora/x"})
    assert started.returncode == 0 and started.stdout == "111\n", started.stderr
    refused = run_id({"success": False, "error-message": "Failed to start run"})
    assert refused.returncode != 0 and "the run did not start: Failed to start run" in refused.stderr


def test_an_unknown_run_id_says_so(tmp_path):
    result = _status(tmp_path, "999")
    assert result.returncode != 0 and "no run 999 on 'remote-federation'" in result.stderr


def test_without_a_run_id_the_newest_run_is_reported(tmp_path):
    result = _status(tmp_path)
    assert result.returncode != 0 and result.stdout == "run 222: finished:failed\n"


def _load_run_status(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_status", REPO / "docker" / "run_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WAIT_POLL", 0.01)
    return module


def _answers(tmp_path: Path, answers: list[str | None]) -> Path:
    """A `flwr` whose `ls` answers one status per call (None: the SuperLink is unreachable)."""
    flwr, calls = tmp_path / "flwr", tmp_path / "calls"
    calls.write_text("0")
    flwr.write_text(f"""#!{sys.executable}
import json, pathlib, sys
calls = pathlib.Path({str(calls)!r}); n = int(calls.read_text()); calls.write_text(str(n + 1))
status = {answers!r}[min(n, {len(answers) - 1})]
if status is None:
    print(json.dumps({{"success": False, "error-message": "Connection to the SuperLink is unavailable."}}))
else:
    print(json.dumps({{"success": True, "runs": [{{"run-id": "111", "status": status}}]}}))
""")
    flwr.chmod(0o755)
    return flwr


def test_wait_outlasts_a_superlink_restart_and_reports_how_the_run_ended(tmp_path, monkeypatch, capsys):
    """`flwr log --stream` ends when the SuperLink restarts; the run goes on. `make run` waits for it
    rather than reporting a running run as failed."""
    run_status = _load_run_status(monkeypatch)
    flwr = _answers(tmp_path, ["running", None, None, "running", "finished:completed"])
    run_status.wait(str(flwr), "remote-federation", "111")
    run_status.report(str(flwr), "remote-federation", "111")
    out, err = capsys.readouterr()
    assert out == "run 111: finished:completed\n"
    assert "run 111 has not finished" in err and "flwr log 111 remote-federation --stream" in err


def test_wait_gives_up_on_a_superlink_that_stays_away(tmp_path, monkeypatch):
    run_status = _load_run_status(monkeypatch)
    monkeypatch.setattr(run_status, "WAIT_UNREACHABLE", 0.05)
    flwr = _answers(tmp_path, ["running", None])
    run_status.wait(str(flwr), "remote-federation", "111")
    with pytest.raises(SystemExit, match="could not list runs on 'remote-federation'.*unavailable"):
        run_status.report(str(flwr), "remote-federation", "111")
