"""Faults on the real Docker engine: what a user gets when a container dies mid-run.

One stack and one output directory for the module, one story told in order (each test picks up
where the previous one left off, as an operator would):

    run 1   round 1: org-2's node (both its containers: SuperNode and ClientApp, docs/isolation.md)
            is SIGKILLed in the fit stage; the round completes with the
            other two (SecAgg+ reconstructs org-2's masks) and records org-2 as dropped; org-2 is
            started again and takes part in round 2.
            round 3: the `serverapp` container is SIGKILLed mid-round; the run ends "failed".
    run 2   the documented resume (`make run` with the same settings) resumes after round 2; in its
            round 3 the SuperLink is stopped for longer than Flower's heartbeat window.
    run 3   the same command again; in round 3 the SuperLink is restarted briefly; round 4; done.

Every completed round's checkpoint stays byte-identical through all of it (adapter, samples and
record), except that round 2's metrics.json gains the held-out loss of its adapter, which round 3's
nodes measure (assert_checkpoints_untouched), and the rounds run
after the faults equal what an uninterrupted run computes from the same checkpoint (each
organisation's update is recomputed outside Flower: training is deterministic given its inputs).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import numpy as np
import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from app.config import NodeConfig, RunConfig
from app.outputs import ADAPTER_FILE, read_adapter
from conftest import DEMO_IMAGES, ORGS, with_defaults
from federation import REPO, kv
from stack import compose, compose_stack, flwr

pytestmark = pytest.mark.docker
ROUNDS = 4
CONFIG = {"base-model": "/models/tiny-sd", "resolution": 32, "num-server-rounds": ROUNDS, "local-steps": 2,
          "learning-rate": 1e-3, "heldout-fraction": 0.25, "sample-every": 0, "min-nodes": 3,
          "node-wait-timeout": 300, "round-timeout": 300, "output-dir": "/outputs/faults"}
# A SecAgg+ round sends each node four messages: setup, key shares, then the masked update (the
# node trains on this one), then unmasking. The third is the fit stage.
FIT_STAGE = 3
# Flower marks a silent SuperNode offline, and a silent ServerApp's run failed, after
# HEARTBEAT_PATIENCE missed heartbeats of HEARTBEAT_DEFAULT_INTERVAL (2 x 30 s in Flower 1.41).
HEARTBEAT_WINDOW = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
# What a fault may add on top of a normal round on this 2-core machine (README: Reliability).
KILLED_NODE_BOUND = HEARTBEAT_WINDOW + 60
# What measuring an adapter later adds to its round's record (app/reporting.py: shared_heldout).
HELDOUT_FIELDS = {"heldout_loss", "num_heldout", "heldout_orgs", "heldout_loss_by_org", "client_eval_seconds"}


class Logs:
    """`docker logs -f CONTAINER` since `since`, collected in the background (Docker's own CLI: the
    Compose plugin's follower delivers lines seconds late, longer than a fit stage can take).

    A follower ends when its container stops, and Docker restarts a node that exits (`restart:
    unless-stopped`): the container is followed again from the last line read, so lines written
    after a restart are counted too."""

    def __init__(self, container: str, since: float) -> None:
        self.container = container
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.closed = False
        threading.Thread(target=self._read, args=(f"{since - 1:.0f}",), daemon=True).start()

    def _read(self, since: str) -> None:
        last = None  # Docker's timestamp of the last line read
        while not self.closed:
            self.proc = subprocess.Popen(["docker", "logs", "-f", "--timestamps", "--since", last or since, self.container],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if self.closed:  # closed while it started: close() killed the one before
                self.proc.kill()
            for line in self.proc.stdout:
                stamp, _, text = line.rstrip().partition(" ")
                if last is None or instant(stamp) > instant(last):  # --since repeats the last line read
                    last = stamp
                    self.lines.append(text)
            self.proc.wait()
            time.sleep(0.5)

    def messages(self, run_id: str, rnd: int) -> int:
        """How many of the run's round `rnd` messages the node has received."""
        count, current = 0, None
        for line in list(self.lines):
            if m := re.search(r"\[RUN (\d+), ROUND (\w+)\]", line):
                current = m.groups()
            elif "Receiving: train message" in line and current == (run_id, str(rnd)):
                count += 1
        return count

    def restarts(self) -> str:
        inspect = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", self.container],
                                 capture_output=True, text=True)
        return inspect.stdout.strip() or inspect.stderr.strip()

    def close(self) -> None:
        self.closed = True
        if self.proc:
            self.proc.kill()


def instant(stamp: str) -> tuple[str, str]:
    """Docker's RFC 3339 timestamp, comparable: it drops the nanoseconds' trailing zeros."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return whole, fraction.ljust(9, "0")


def wait_for(condition, what: str, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return result


class Story:
    """The module's one federation: the stack, its output directory and what happened so far."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.out = stack["root"] / "outputs" / "faults"
        self.runs: list[dict] = []  # {"id", "make": Popen of `make run`, "log": file}
        self.checkpoints: dict[str, bytes] = {}
        self.figures: dict[str, float] = {}
        self.began = time.time()  # node logs are read from here on (each round is named by its run)

    def logs(self, org: str) -> Logs:
        """The organisation's SuperNode's log: it names each message it receives (the ClientApp
        container's log has the run's code's lines)."""
        return Logs(self.container(f"{org}-supernode"), self.began)

    def make_run(self) -> dict:
        """The documented command, start and resume alike: `make run RUN_CONFIG=...` with the same settings."""
        before = set(self.run_ids())
        log = open(self.stack["root"] / f"make-run-{len(self.runs) + 1}.log", "w+")
        proc = subprocess.Popen(["make", "run", f"RUN_CONFIG={kv(CONFIG)}"], cwd=REPO, env=self.stack["env"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        run_id = wait_for(lambda: next(iter(set(self.run_ids()) - before), None), "the run to be submitted", 120)
        run = {"id": run_id, "make": proc, "log": log, "started": time.monotonic()}
        self.runs.append(run)
        return run

    def listed(self, *args: str) -> list[dict] | None:
        """`flwr ls`'s runs; None while the SuperLink is away (then `flwr` may still exit 0, with an
        error object for JSON: seen while a stopped SuperLink was starting again)."""
        listing = flwr(self.stack, "ls", "remote-federation", "--format", "json", *args)
        try:
            return json.loads(listing.stdout)["runs"] if listing.returncode == 0 else None
        except (json.JSONDecodeError, KeyError):
            return None

    def run_ids(self) -> list[str]:
        return [str(r["run-id"]) for r in self.listed() or []]

    def status(self, run_id: str) -> str | None:
        return next((r["status"] for r in self.listed("--run-id", run_id) or [] if str(r["run-id"]) == run_id), None)

    def output(self, run: dict, timeout: float) -> tuple[int, str]:
        """`make run`'s exit code and output, once it ends."""
        code = run["make"].wait(timeout=timeout)
        run["log"].seek(0)
        return code, run["log"].read()

    def history(self) -> dict[int, dict]:
        path = self.out / "metrics.jsonl"
        return {m["round"]: m for m in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}

    def round_done(self, rnd: int, timeout: float) -> dict:
        return wait_for(lambda: self.history().get(rnd), f"round {rnd}'s checkpoint", timeout)

    def mid_round(self, node: Logs, run: dict, rnd: int, timeout: float = 600) -> None:
        """Return once `node` is in round `rnd`'s fit stage (it has just received the message it trains on)."""
        try:
            wait_for(lambda: node.messages(run["id"], rnd) >= FIT_STAGE, f"round {rnd}'s fit stage", timeout, every=0.2)
        except AssertionError as err:
            tail = "\n".join(node.lines[-40:])
            raise AssertionError(f"{err}\nrun {run['id']}; the node restarted {node.restarts()} times; "
                                 f"its last lines:\n{tail}") from None

    def make_run_into_round(self, rnd: int) -> dict:
        """`make run`, returned once org-1 is in round `rnd`'s fit stage."""
        org1 = self.logs("org-1")
        run = self.make_run()
        try:
            self.mid_round(org1, run, rnd)
        finally:
            org1.close()
        return run

    def container(self, service: str) -> str:
        container = compose(self.stack, "ps", "-q", service).stdout.strip()
        assert container, f"{service} is not running"
        return container

    def kill(self, *containers: str) -> None:
        """SIGKILL, by container id: no Compose CLI start-up between seeing the moment and acting."""
        assert subprocess.run(["docker", "kill", "--signal", "KILL", *containers], capture_output=True).returncode == 0

    def snapshot(self) -> dict[str, bytes]:
        """Every file of every completed round, by path."""
        return {str(p.relative_to(self.out / "rounds")): p.read_bytes()
                for p in sorted((self.out / "rounds").glob("round-*/*")) if p.is_file()}

    def assert_checkpoints_untouched(self, now: dict[str, bytes]) -> None:
        """The rounds completed before the faults were never rewritten. The one thing a later round
        adds is the held-out loss of the previous round's adapter, measured by its nodes: round 2's,
        as soon as a round 3 collects its fit replies (whether or not that round completes)."""
        for path, content in self.checkpoints.items():
            if path == "round-0002/metrics.json":
                before, after = json.loads(content), json.loads(now[path])
                assert {k: after[k] for k in before if k != "heldout_loss"} == \
                    {k: v for k, v in before.items() if k != "heldout_loss"}, "round 2's record changed"
                assert set(after) - set(before) <= HELDOUT_FIELDS, after
            else:
                assert now[path] == content, f"{path} changed"


@pytest.fixture(scope="module")
def faults_stack():
    with compose_stack("fedlora-faults", images_per_org=list(DEMO_IMAGES)) as s:
        yield s


@pytest.fixture(scope="module")
def story(faults_stack):
    story = Story(faults_stack)
    yield story
    for run in story.runs:
        if run["make"].poll() is None:
            run["make"].kill()
    print("figures:", json.dumps(story.figures, indent=1))


def test_killed_supernode_drops_out_of_its_round_and_rejoins_the_next(story):
    # The whole node, as when its host dies: the SuperNode (heartbeats stop) and the ClientApp
    # container that is training.
    node = [story.container(f"org-2-{part}") for part in ("supernode", "clientapp")]
    org2 = story.logs("org-2")
    run = story.make_run()
    try:
        story.mid_round(org2, run, 1)
        story.kill(*node)
        killed = time.monotonic()
    finally:
        org2.close()
    r1 = story.round_done(1, timeout=KILLED_NODE_BOUND + 300)
    story.figures["killed node: kill to round 1 checkpoint (s)"] = time.monotonic() - killed
    story.figures["killed node: round 1 fit stage (s)"] = r1["seconds"]["fit"]
    assert r1["participants"] == list(ORGS)
    assert r1["aggregated"] == ["org-1", "org-3"] and r1["dropped"] == ["org-2"], r1
    assert r1["aggregation"] == "secagg+"

    # Started again by its operator: Flower refuses its key until the SuperLink has marked the killed
    # node offline; by now the round's own wait for it has passed that point.
    started = time.monotonic()
    assert compose(story.stack, "start", "org-2-supernode", "org-2-clientapp").returncode == 0
    r2 = story.round_done(2, timeout=600)
    story.figures["killed node: restart to round 2 checkpoint (s)"] = time.monotonic() - started
    assert r2["aggregated"] == list(ORGS) and r2["dropped"] == [], r2
    assert story.status(run["id"]) == "running"  # the same run goes on


def test_killed_serverapp_fails_the_run(story):
    run = story.runs[0]
    org1, container = story.logs("org-1"), story.container("serverapp")
    try:
        story.mid_round(org1, run, 3)
        story.kill(container)
        killed = time.monotonic()
    finally:
        org1.close()
    story.checkpoints = story.snapshot()
    assert sorted({k.split("/")[0] for k in story.checkpoints}) == [f"round-{r:04d}" for r in range(3)]
    wait_for(lambda: story.status(run["id"]) == "finished:failed", "the SuperLink to mark the run failed",
             HEARTBEAT_WINDOW + 120, every=3)
    story.figures["killed serverapp: kill to run marked failed (s)"] = time.monotonic() - killed
    code, output = story.output(run, timeout=120)
    assert code != 0 and f"run {run['id']}: finished:failed" in output, output[-3000:]
    assert 3 not in story.history()


def test_superlink_down_past_the_heartbeat_window_fails_the_run_and_nothing_completed_is_lost(story):
    # The documented recovery: `make up` starts what is down, then the same `make run` resumes.
    up = subprocess.run(["make", "up"], cwd=REPO, env=story.stack["env"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    run = story.make_run_into_round(3)
    stopped = time.monotonic()
    assert compose(story.stack, "stop", "superlink").returncode == 0
    time.sleep(max(0.0, HEARTBEAT_WINDOW + 15 - (time.monotonic() - stopped)))
    assert compose(story.stack, "start", "superlink").returncode == 0
    story.figures["superlink down (s)"] = time.monotonic() - stopped
    final = wait_for(lambda: (s := story.status(run["id"])) and s.startswith("finished") and s, "run 2 to end",
                     HEARTBEAT_WINDOW + 240, every=3)
    story.figures["superlink down: start to run 2 ended (s)"] = time.monotonic() - stopped - story.figures["superlink down (s)"]
    code, output = story.output(run, timeout=120)
    print(output[-4000:])
    assert final == "finished:failed", output[-3000:]
    # `make run` waited through the outage and reports how the run ended.
    assert code != 0 and f"run {run['id']}: finished:failed" in output, output[-3000:]
    assert "resuming after round 2" in output
    assert 3 not in story.history()
    now = story.snapshot()
    assert now.keys() == story.checkpoints.keys(), sorted(now.keys() - story.checkpoints.keys())
    story.assert_checkpoints_untouched(now)


def test_superlink_restart_mid_round_and_resume_complete_the_run(story):
    run = story.make_run_into_round(3)
    restarted = time.monotonic()
    assert compose(story.stack, "restart", "superlink").returncode == 0
    story.figures["superlink restart took (s)"] = time.monotonic() - restarted
    code, output = story.output(run, timeout=900)
    print(output[-4000:])
    assert code == 0 and f"run {run['id']}: finished:completed" in output, output[-3000:]
    assert "resuming after round 2" in output
    history = story.history()
    assert sorted(history) == list(range(ROUNDS + 1))
    for rnd in (3, 4):
        assert history[rnd]["aggregated"] == list(ORGS) and history[rnd]["dropped"] == [], history[rnd]
    story.figures["round 3 with a superlink restart (s)"] = history[3]["seconds"]["round"]
    story.figures["round 4, no fault (s)"] = history[4]["seconds"]["round"]
    story.figures["round 4 fit stage, no fault (s)"] = history[4]["seconds"]["fit"]
    now = story.snapshot()
    story.assert_checkpoints_untouched(now)
    assert json.loads(now["round-0002/metrics.json"])["heldout_loss"] is not None  # measured in round 3
    assert (story.out / "final" / ADAPTER_FILE).read_bytes() == now[f"round-{ROUNDS:04d}/{ADAPTER_FILE}"]
    # A killed node costs its round about one heartbeat window, not more.
    assert history[1]["seconds"]["fit"] < history[4]["seconds"]["fit"] + KILLED_NODE_BOUND, history[1]["seconds"]


def test_rounds_after_the_faults_equal_an_uninterrupted_run(story):
    """Recompute rounds 3 and 4 from the checkpoint before each, as a run without faults would:
    each organisation's update (deterministic given its inputs), then their weighted mean."""
    import torch

    from app.training import local_update

    root = story.stack["root"]
    cfg = RunConfig.from_flower(with_defaults(CONFIG | {"base-model": str(root / "models" / "tiny-sd")}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes train (SILO_THREADS): another order of sums differs by ~1e-6
    try:
        for rnd in (3, 4):
            before = list(read_adapter(story.out / "rounds" / f"round-{rnd - 1:04d}").values())
            after = list(read_adapter(story.out / "rounds" / f"round-{rnd:04d}").values())
            updates, counts = [], []
            for org in ORGS:
                node = NodeConfig(root / "data" / org, org, None, root / f"recompute-{org}")
                update, n, _ = local_update(cfg, node, before, rnd)
                updates.append(update)
                counts.append(n)
            expected = [b + sum(n * u[i].astype(np.float64) for u, n in zip(updates, counts)) / sum(counts)
                        for i, b in enumerate(before)]
            err = max(float(np.max(np.abs(e - a))) for e, a in zip(expected, after))
            scale = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
            story.figures[f"round {rnd}: max |federated - recomputed|"] = err
            assert scale > 1e-4, "the round's update is too small for the comparison to mean anything"
            assert err < 1e-5, f"round {rnd}: {err:.2e} away from what an uninterrupted run gives"
    finally:
        torch.set_num_threads(threads)
