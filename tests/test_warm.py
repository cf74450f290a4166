"""Warm trainers (app/trainer.py): real trainer processes over their real Unix sockets.

What a node gets from one: the same numbers as the in-process path, a model loaded once for many
messages, the run's code and no other, and a crash that costs one message.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app import trainer, training
from app.config import NodeConfig, RunConfig
from app.data import DataError
from conftest import REPO, tiny_run_config, with_defaults

ORG = "org-1"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Trainers and the in-process path on one thread each: the same sums in the same order."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Node:
    """One organisation's settings and the messages its ClientApp would send to its trainer."""

    def __init__(self, tiny_model: Path, demo_data: Path, cache: Path, **run) -> None:
        self.run_config = with_defaults(tiny_run_config(tiny_model, cache.parent / "out", **run))
        self.node_config = {"data-dir": str(demo_data / ORG), "org": ORG, "cache-dir": str(cache)}
        self.cfg, self.node = RunConfig.from_flower(self.run_config), NodeConfig.from_flower(self.node_config)

    def warm(self) -> trainer.Connection:
        """What one ClientApp process holds; the trainer lives as long as this test process."""
        return trainer.connection(self.node, self.run_config, self.node_config, watch_pid=os.getpid())

    def initial_adapter(self) -> list[np.ndarray]:
        from app import model

        return list(model.lora_state(model.LoraUNet.load(self.cfg).unet).values())


def stop_trainers(cache: Path) -> None:
    for path in (cache / "trainers").glob("*.sock"):
        if sock := trainer._try_connect(path):
            with sock:
                trainer.send(sock, {"op": "exit", "org": ORG})
    deadline = time.monotonic() + 30
    while list((cache / "trainers").glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One trainer for the tests that share it, as one node's messages would."""
    path = tmp_path_factory.mktemp("warm") / "cache"
    yield path
    stop_trainers(path)


@pytest.fixture
def own_cache(tmp_path):
    yield tmp_path / "cache"
    stop_trainers(tmp_path / "cache")


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def long_fit(n: Node, deadline_s: float = 300) -> tuple[trainer.Connection, dict, threading.Thread]:
    """A fit of `local-steps` 2000 in a thread, returned once the trainer is training; `outcome`
    gets its result or its error."""
    conn, outcome = n.warm(), {}

    def fit():
        try:
            outcome["result"] = conn.fit(n.cfg, n.initial_adapter(), 1)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + deadline_s
    while "training 2000 steps" not in (conn.log_path.read_text() if conn.log_path.exists() else ""):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.1)
    return conn, outcome, thread


def test_warm_trainer_computes_what_the_clientapp_computes(tiny_model, demo_data, cache):
    """Two rounds: in round 2 the trainer's resident model has already trained once, the in-process
    path loads a fresh one; both must start from the global adapter they are sent."""
    n = Node(tiny_model, demo_data, cache)
    assert n.warm().prepare(n.cfg) == training.prepare(n.cfg, n.node)
    received = n.initial_adapter()
    for rnd in (1, 2):
        here, count, report = training.local_update(n.cfg, n.node, received, rnd)
        there, warm_count, warm_report = n.warm().fit(n.cfg, received, rnd)
        assert warm_count == count and largest_difference(here, there) <= 1e-7
        assert max(float(np.max(np.abs(u))) for u in here) > 1e-4  # a real update, not zeros on both sides
        for key in ("received_fingerprint", "heldout_loss", "train_loss", "num_heldout", "skipped_images"):
            assert warm_report[key] == pytest.approx(report[key], abs=1e-7), key
        received = [g + u for g, u in zip(received, here)]
    loss, count, report = training.measure(n.cfg, n.node, received, 3)
    warm_loss, warm_count, warm_report = n.warm().evaluate(n.cfg, received, 3)
    assert (warm_loss, warm_count) == pytest.approx((loss, count), abs=1e-7)
    assert warm_report["received_fingerprint"] == report["received_fingerprint"]


def test_later_messages_find_the_model_and_latents_resident(tiny_model, demo_data, cache):
    n = Node(tiny_model, demo_data, cache)
    received = n.initial_adapter()
    first = n.warm()
    first.fit(n.cfg, received, 1)
    again = n.warm()
    again.fit(n.cfg, received, 2)
    before, after = first.last_reply, again.last_reply
    assert after["pid"] == before["pid"] and after["counts"]["requests"] == before["counts"]["requests"] + 1
    assert after["counts"]["model_loads"] == before["counts"]["model_loads"]
    assert after["counts"]["data_loads"] == before["counts"]["data_loads"]
    print(f"warm fit: first training step {after['training_started_at'] - again.created:.3f} s after the message "
          f"reached the app (held-out evaluation {after['result']['report']['eval_seconds']:.3f} s of it)")

    # Another LoRA shape is another model: loaded in place of the resident one, the latents kept.
    wider = Node(tiny_model, demo_data, cache, **{"lora-rank": 4})
    other = wider.warm()
    other.fit(wider.cfg, wider.initial_adapter(), 1)
    assert other.last_reply["counts"]["model_loads"] == after["counts"]["model_loads"] + 1
    assert other.last_reply["counts"]["data_loads"] == after["counts"]["data_loads"]


def test_errors_of_the_computation_reach_the_clientapp_as_themselves(tiny_model, demo_data, cache, tmp_path):
    n = Node(tiny_model, demo_data, cache)
    missing = Node(tiny_model, tmp_path, cache)
    with pytest.raises(DataError, match="does not exist on this node") as raised:
        missing.warm().prepare(missing.cfg)
    with pytest.raises(DataError) as in_process:
        training.prepare(missing.cfg, missing.node)
    assert str(raised.value) == str(in_process.value)
    # The trainer serves on.
    alive = n.warm()
    alive.prepare(n.cfg)
    assert alive.last_reply["counts"]["requests"] > 1


def other_code(tmp_path: Path) -> Path:
    """A copy of the app whose training takes one step more than asked: another version of the code."""
    root = tmp_path / "other-code"
    shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "app" / "model.py", "a") as f:
        f.write("\n_train = LoraUNet.train\n"
                "LoraUNet.train = lambda self, data, steps, *a, **k: _train(self, data, steps + 1, *a, **k)\n")
    return root


def start_trainer(code: Path, path: Path) -> subprocess.Popen:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "app.trainer", "--socket", str(path), "--org", ORG,
                             "--watch-pid", str(os.getpid())], cwd=code)
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the other code's trainer did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("where", ["its own socket", "this run's socket"])
def test_a_trainer_of_other_code_never_trains_for_the_run(tiny_model, demo_data, own_cache, tmp_path, where):
    """Left over from an earlier version (its own socket), or found where this run's trainer should
    be: either way the run's own code trains, and the other trainer is gone."""
    n = Node(tiny_model, demo_data, own_cache)
    code = other_code(tmp_path)
    assert trainer.code_hash(code / "app") != trainer.code_hash()
    conn = n.warm()
    path = conn.path if where == "this run's socket" else conn.path.with_name(
        f"{conn.path.name.split('-')[0]}-{trainer.code_hash(code / 'app')[:16]}.sock")
    other = start_trainer(code, path)
    received = n.initial_adapter()

    update, _, _ = conn.fit(n.cfg, received, 1)

    other.wait(timeout=30)  # told to exit (or, had it not gone, stopped)
    assert conn.last_reply["pid"] != other.pid
    expected, _, _ = training.local_update(n.cfg, n.node, received, 1)
    assert largest_difference(update, expected) <= 1e-7
    # What the other code computes (one step more) is told apart by that comparison.
    one_more = RunConfig.from_flower(n.run_config | {"local-steps": n.cfg.local_steps + 1})
    assert largest_difference(update, training.local_update(one_more, n.node, received, 1)[0]) > 1e-5


def test_a_killed_trainer_fails_its_message_and_the_next_one_starts_fresh(tiny_model, demo_data, own_cache):
    conn, outcome, worker = long_fit(Node(tiny_model, demo_data, own_cache, **{"local-steps": 2000}), 120)
    killed = conn.pid
    os.kill(killed, signal.SIGKILL)
    worker.join(timeout=60)

    error = outcome.get("error")
    assert isinstance(error, trainer.TrainerCrashed), outcome
    assert f"warm trainer (pid {killed}) died during fit" in str(error)
    assert "next message starts a fresh trainer" in str(error)

    n = Node(tiny_model, demo_data, own_cache)
    again = n.warm()
    update, count, _ = again.fit(n.cfg, n.initial_adapter(), 1)
    assert again.last_reply["pid"] != killed and again.last_reply["counts"]["requests"] == 1
    assert count > 0 and len(update) == len(n.initial_adapter())


def test_without_warm_trainer_the_clientapp_works_in_process(tiny_model, demo_data, own_cache):
    n = Node(tiny_model, demo_data, own_cache)
    node = NodeConfig.from_flower(n.node_config | {"warm-trainer": False})
    assert trainer.connection(node, n.run_config, n.node_config) is None
    # Flower's Simulation Engine runs ClientApps in its own long-lived workers: they work in process.
    simulated = NodeConfig.from_flower({"partition-id": 0, "num-partitions": 3},
                                       n.run_config | {"sim-data-dir": str(demo_data)})
    assert simulated.org == ORG and trainer.connection(simulated, n.run_config, {}) is None


def test_the_clientapp_side_imports_no_torch():
    probe = "import sys, app.client_app, app.trainer; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_trainer_runs_from_its_own_copy_of_the_app_and_removes_it(tiny_model, demo_data, own_cache):
    """The node removes each ClientApp process's fresh install of the bundle when that process exits
    (docker/bundle_guard.py); the trainer and its workers outlive it, so they run from their own copy."""
    n = Node(tiny_model, demo_data, own_cache)
    conn = n.warm()
    conn.prepare(n.cfg)
    home = Path(os.readlink(f"/proc/{conn.last_reply['pid']}/cwd"))
    assert home != REPO and home.name.startswith("fedlora-trainer-")
    assert trainer.code_hash(home / "app") == trainer.code_hash()
    stop_trainers(own_cache)
    deadline = time.monotonic() + 30
    while home.exists():
        assert time.monotonic() < deadline, f"{home} is still there after the trainer exited"
        time.sleep(0.1)


def app_imports() -> dict[str, set[str]]:
    """Which app modules each app module imports, at its top or inside a function."""
    import ast

    graph = {}
    for path in sorted((REPO / "app").glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
                found.add(node.module.removeprefix("app."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("app.") for a in node.names if a.name.startswith("app.")}
        graph[path.stem] = {m.split(".")[0] for m in found}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported, path + [module]):
                return cycle
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_no_app_module_imports_itself_back():
    """The training steps live in app/training.py: the ClientApp, the warm trainer and its training
    processes import them, and none of them the other's module back."""
    graph = app_imports()
    assert {"training", "trainer"} <= graph["client_app"] and "training" in graph["parallel"]
    assert import_cycle(graph) is None, import_cycle(graph)
    # The check sees a circle where there is one: the layout before app/training.py.
    assert import_cycle(graph | {"trainer": graph["trainer"] | {"client_app"}}) == ["client_app", "trainer", "client_app"]
