"""Only app bundles an organisation approved run on its node (docker/bundle_guard.py, docs/approval.md).

Unit level: the guard with Flower's own installer and real bundles from Flower's own builder; the
organisation's tool (docker/bundles.py); the Flower internals the seam relies on, pinned. The loopback
federation test runs real SuperNodes with the wrappers first on PATH: a modified bundle is refused by
every organisation, runs once they approve it, and bytes that do not match their stated hash are refused.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.admission import BUNDLE_REFUSED
from federation import REPO, LocalFederation, approving_env, kv, load_module

GUARD = REPO / "docker" / "bundle_guard.py"


bundle_guard = load_module("bundle_guard", GUARD)
bundles = load_module("bundles_tool", REPO / "docker" / "bundles.py")


def app_tree(dest: Path, marker: Path | None = None) -> Path:
    """The shipped app as `flwr run` sees it (its tracked files), optionally with one line added to the
    ClientApp that writes `marker` when the node imports it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, dest / name)
    if marker:
        with open(dest / "app" / "client_app.py", "a") as f:
            f.write(f"\n__import__('pathlib').Path({str(marker)!r}).write_text('the bundle ran')\n")
    return dest


def fab_of(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk  # what `flwr run` submits

    return build_fab_from_disk(app_dir)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> bytes:
    return fab_of(app_tree(tmp_path_factory.mktemp("shipped")))


@pytest.fixture(scope="module")
def modified(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("modified")
    return fab_of(app_tree(root / "app-dir", marker=root / "marker"))


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def guard(tmp_path: Path, approved: list[str], stated: list[str] = ()):
    from flwr.cli.install import install_from_fab

    (tmp_path / "approved.txt").write_text("".join(f"{h}  2026-01-01T00:00:00Z  test\n" for h in approved))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    g = bundle_guard.Guard(install_from_fab, tmp_path / "approved.txt", tmp_path / "refused", home)
    g.stated.extend(stated)
    return g, home


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))


# --- The guard, with Flower's installer and real bundles -----------------------------------------

def test_an_unapproved_bundle_is_refused_kept_and_never_installed(tmp_path, flwr_home, shipped, modified, capsys):
    g, home = guard(tmp_path, approved=[sha(shipped)], stated=[sha(modified)])
    with pytest.raises(bundle_guard.BundleRefused) as refused:
        g.install(modified, skip_prompt=True)
    message = str(refused.value)  # what reaches the coordinator
    assert BUNDLE_REFUSED + sha(modified) in message  # what the ServerApp's admission recognises
    assert f"make approve-bundle FAB={sha(modified)}" in message
    assert str(tmp_path) not in message  # the node's paths stay in its own log
    log = capsys.readouterr().err
    assert message in log and str(tmp_path / "refused" / f"{sha(modified)}.fab") in log
    assert list(home.iterdir()) == []  # nothing of it on disk to import
    assert (tmp_path / "refused" / f"{sha(modified)}.fab").read_bytes() == modified


def test_an_approved_bundle_is_installed_afresh_and_read_only(tmp_path, flwr_home, shipped):
    g, home = guard(tmp_path, approved=[sha(shipped)], stated=[sha(shipped)])
    path = g.install(shipped, skip_prompt=True)
    assert path.parent.parent == home and (path / "app" / "client_app.py").is_file()
    assert not os.access(path / "app" / "client_app.py", os.W_OK) or os.geteuid() == 0
    assert (path / "app" / "client_app.py").stat().st_mode & 0o222 == 0
    assert not (tmp_path / "refused").exists()


def test_bytes_that_do_not_match_the_stated_hash_are_refused_even_if_both_are_approved(
        tmp_path, flwr_home, shipped, modified):
    g, home = guard(tmp_path, approved=[sha(shipped), sha(modified)], stated=[sha(shipped)])
    with pytest.raises(bundle_guard.BundleRefused, match=f"do not match the hash stated for it \\({sha(shipped)}\\)"):
        g.install(modified, skip_prompt=True)
    assert list(home.iterdir()) == []


def test_without_an_approved_list_nothing_runs(tmp_path, flwr_home, shipped):
    from flwr.cli.install import install_from_fab

    g = bundle_guard.Guard(install_from_fab, tmp_path / "missing.txt", tmp_path / "refused", tmp_path / "home")
    with pytest.raises(bundle_guard.BundleRefused, match=BUNDLE_REFUSED + sha(shipped)):
        g.install(shipped, skip_prompt=True)


def test_the_approved_list_reads_what_the_tool_writes_and_forgets_what_it_revokes(tmp_path, shipped, modified, capsys):
    approval = tmp_path / "approval"
    fab = tmp_path / "x.fab"
    fab.write_bytes(shipped)
    bundles.main(["--approval-dir", str(approval), "approve", str(fab)])
    bundles.main(["--approval-dir", str(approval), "approve", str(fab)])  # twice: listed once
    assert bundle_guard.approved_hashes(approval / "approved-bundles.txt") == {sha(shipped)}
    assert (approval / "bundles" / f"{sha(shipped)}.fab").read_bytes() == shipped
    bundles.main(["--approval-dir", str(approval), "revoke", sha(shipped)])
    assert bundle_guard.approved_hashes(approval / "approved-bundles.txt") == set()
    assert f"# revoked" in (approval / "approved-bundles.txt").read_text()


def test_review_prints_the_hash_the_files_and_the_diff_against_the_last_approved(tmp_path, shipped, modified, capsys):
    approval = tmp_path / "approval"
    (approval / "refused").mkdir(parents=True)
    (approval / "refused" / f"{sha(modified)}.fab").write_bytes(modified)  # as `make review-bundle` copies it
    (tmp_path / "shipped.fab").write_bytes(shipped)
    bundles.main(["--approval-dir", str(approval), "approve", str(tmp_path / "shipped.fab")])
    capsys.readouterr()
    bundles.main(["--approval-dir", str(approval), "review", sha(modified)])
    out = capsys.readouterr().out
    assert f"sha256   {sha(modified)}" in out and "not approved" in out
    assert "app/client_app.py" in out and "pyproject.toml" in out
    diff = out.split("changes since the last approved bundle")[1]
    assert sha(shipped) in diff.splitlines()[0]
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(added) == 2 and "the bundle ran" in added[1]  # the blank line and the marker line
    assert "--- a/app/client_app.py" in diff and "app/model.py" not in diff


def test_review_refuses_a_kept_bundle_changed_after_it_was_kept(tmp_path, shipped, modified):
    approval = tmp_path / "approval"
    (approval / "refused").mkdir(parents=True)
    (approval / "refused" / f"{sha(shipped)}.fab").write_bytes(modified)
    with pytest.raises(SystemExit, match="does not hash to its name"):
        bundles.main(["--approval-dir", str(approval), "approve", sha(shipped)])
    assert not (approval / "approved-bundles.txt").exists()


# --- What the bundle carries ---------------------------------------------------------------------

def test_documentation_edits_leave_the_bundle_hash_unchanged_and_code_edits_do_not(tmp_path, shipped):
    tree = app_tree(tmp_path / "t")
    (tree / "README.md").write_text((tree / "README.md").read_text() + "\nA new paragraph.\n")
    (tree / "docs").mkdir(exist_ok=True)
    (tree / "docs" / "new.md").write_text("# New page\n")
    (tree / "docker" / "join" / "README.md").write_text("edited\n")
    (tree / "tests" / "test_new.py").write_text("def test_x():\n    pass\n")
    (tree / "app" / "partition.py").write_text((tree / "app" / "partition.py").read_text() + "\n# a host tool\n")
    # Flower rewrites pyproject.toml into the bundle: its comments never reach it.
    (tree / "pyproject.toml").write_text((tree / "pyproject.toml").read_text().replace(
        "[tool.flwr.app.config]", "# A comment for the reader.\n[tool.flwr.app.config]"))
    assert sha(fab_of(tree)) == sha(shipped)
    (tree / "app" / "wire.py").write_text((tree / "app" / "wire.py").read_text() + "\n# code\n")
    assert sha(fab_of(tree)) != sha(shipped)


def _app_imports(path: Path) -> set[str]:
    """The app modules a module imports (relative or as app.x), at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base == "app" or base.startswith("app."):
                mod = base.removeprefix("app").lstrip(".")
                names = [mod] if mod else [a.name for a in node.names]
                found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("app."))
    return found


def test_the_bundle_carries_exactly_the_modules_its_components_import(shipped):
    import io
    import tomllib
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(shipped)).namelist()
    carried = {Path(n).stem for n in names if n.startswith("app/") and n != "app/__init__.py"}
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    # The components, and what the ClientApp starts with `python -m` from the bundle (app/trainer.py).
    todo = [ref.split(":")[0].removeprefix("app.") for ref in components.values()] + ["trainer", "parallel"]
    needed = set()
    while todo:
        mod = todo.pop()
        if mod not in needed:
            needed.add(mod)
            todo += _app_imports(REPO / "app" / f"{mod}.py")
    assert carried == needed


# --- The Flower internals the seam relies on (flwr 1.41): a test fails if an upgrade moves one ------

def test_flower_starts_every_bundle_kind_on_a_node_by_bare_name_from_path():
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supernode import start_client_internal

    # The SuperNode creates ClientApp or AgentApp tasks only; nothing else runs a bundle on a node.
    source = inspect.getsource(start_client_internal._pull_and_store_message)
    assert "TaskType.AGENT_APP\n                if run_info.primary_task_type == TaskType.AGENT_APP\n" \
           "                else TaskType.CLIENT_APP" in source
    assert source.count("state.create_task(") == 1
    assert {TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP], TASK_TYPE_TO_COMMAND[TaskType.AGENT_APP]} \
        == set(bundle_guard.COMMANDS)
    # ... by the bare command name (a PATH lookup), in subprocess isolation from a SuperExec started the same way.
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]," in inspect.getsource(SubprocessExecutor.launch)
    assert 'command = ["flower-superexec"]' in inspect.getsource(start_client_internal.start_client_internal)


def test_every_flower_caller_of_install_from_fab_on_a_node_is_guarded():
    import flwr

    root = Path(flwr.__file__).parent
    callers = {str(p.relative_to(root)) for p in root.rglob("*.py") if "install_from_fab(" in p.read_text()}
    # The node's two task processes are guarded; the rest run elsewhere: the coordinator's ServerApp and
    # simulation, the CLI's own `flwr install`/review, the deprecated start_client.
    assert callers == {"supernode/runtime/run_clientapp.py", "supercore/task_process/agent/run_agentapp.py",
                       "superlink/runtime/run_serverapp.py", "simulation/app.py", "cli/install.py",
                       "cli/app_cmd/review.py", "compat/client/app.py"}
    assert {m.replace(".", "/") + ".py" for m in bundle_guard.GUARDED_MODULES.values()} == {
        "flwr/supernode/runtime/run_clientapp.py", "flwr/supercore/task_process/agent/run_agentapp.py"}


def test_the_guarded_processes_read_the_fab_then_install_it_by_the_names_the_guard_replaces():
    from flwr.supercore.task_process.agent import run_agentapp as _  # noqa: F401
    import importlib

    clientapp = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    agentapp = importlib.import_module("flwr.supercore.task_process.agent.run_agentapp")
    run = inspect.getsource(clientapp.run_clientapp)
    assert "message, context, run, fab = pull_task_input(client)" in run
    assert run.index("install_from_fab(fab.content, skip_prompt=True)") < run.index("client_app(message=message")
    assert "fab = fab_from_proto(res.fab)" in inspect.getsource(clientapp.pull_task_input)
    # An exception before the ClientApp runs becomes an error reply to the ServerApp, with its text.
    assert "reply_message = Message(Error(code=e_code, reason=reason), reply_to=message)" in run
    assert """reason = str(type(ex)) + ":<'" + str(ex) + "'>\"""" in run
    lifecycle = inspect.getsource(agentapp._AgentAppTaskLifecycle)
    assert "fab = fab_from_proto(res.fab)" in lifecycle
    assert "install_from_fab(fab.content, skip_prompt=True)" in lifecycle
    assert "app_path = install_from_fab(fab_content, skip_prompt=True)" in inspect.getsource(agentapp.preload_agentapp)
    # The guard replaces exactly these module globals.
    saved = {m: (m.install_from_fab, m.fab_from_proto) for m in (clientapp, agentapp)}
    try:
        g = bundle_guard.Guard(None, Path("/nonexistent"), None, Path("/nonexistent"))
        assert bundle_guard.install_guard(g) == [clientapp, agentapp]
        assert clientapp.install_from_fab == g.install and agentapp.install_from_fab == g.install
    finally:
        for m, (install, fab_from_proto) in saved.items():
            m.install_from_fab, m.fab_from_proto = install, fab_from_proto


def test_flower_installs_and_loads_under_flwr_home_read_at_each_call(tmp_path, monkeypatch, shipped):
    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "a"))
    path = install_from_fab(shipped, skip_prompt=True)
    assert path == get_project_dir("fedlora/fedlora-diffusion", "0.1.0", sha(shipped))
    assert path.is_relative_to(tmp_path / "a")
    # And reuses an install of the same hash without looking at it: why each process gets its own home.
    (path / "app" / "client_app.py").write_text("tampered")
    assert install_from_fab(shipped, skip_prompt=True) == path
    assert (path / "app" / "client_app.py").read_text() == "tampered"


def test_the_wrappers_run_flowers_own_entry_points(tmp_path):
    env = os.environ | {"PATH": approving_env("org-1", tmp_path)["PATH"], "TMPDIR": str(tmp_path)}
    # An install home left by a process that was killed is removed by the next one; a live one's stays.
    (tmp_path / "fedlora-app-999999999-x" / "apps").mkdir(parents=True)
    (tmp_path / "fedlora-app-999999999-x").chmod(0o555)
    (tmp_path / f"fedlora-app-{os.getpid()}-y").mkdir()
    for command in bundle_guard.COMMANDS:
        assert shutil.which(command, path=env["PATH"]) == str(REPO / "docker" / "bin" / command)
        out = subprocess.run([command, "--help"], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {command} "), out.stderr
    # Each process's install home is gone with it.
    assert [p.name for p in tmp_path.iterdir()] == [f"fedlora-app-{os.getpid()}-y"]


def test_the_app_image_puts_the_wrappers_first_on_path():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    app_stage = dockerfile.split("FROM base AS app")[1]
    assert "ENV PATH=/usr/local/lib/fedlora/bin:$PATH" in app_stage
    assert "COPY docker/bin/ /usr/local/lib/fedlora/bin/" in app_stage
    assert "COPY docker/bundle_guard.py /usr/local/lib/fedlora/" in app_stage
    for command in bundle_guard.COMMANDS:
        assert os.access(REPO / "docker" / "bin" / command, os.X_OK)


# --- On a real federation: three SuperNodes with the wrappers first on PATH ------------------------

def _tampering_supernode(replacement: Path) -> list[str]:
    """flower-supernode whose API hands the ClientApp `replacement`'s bytes under the stated hash: a
    compromised SuperNode, or whatever relays the bundle to the ClientApp's container."""
    code = ("import sys; from pathlib import Path; from flwr.supercore.fab import Fab; "
            "from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState as S; "
            "from flwr.supernode.cli import flower_supernode; "
            f"bad = Path({str(replacement)!r}).read_bytes(); real = S.get_fab; "
            "S.get_fab = lambda self, h: (lambda f: f and Fab(f.hash_str, bad, f.verifications))(real(self, h)); "
            "sys.argv[0] = 'flower-supernode'; flower_supernode()")
    return [sys.executable, "-c", code]


def _federation_settings(tmp_path: Path, tiny_model: Path, demo_data: Path):
    """Three organisations, each with its own approved list and refused-bundle folder, their SuperNodes
    with the wrappers first on PATH (as the app image has them); a one-round run on the tiny model."""
    orgs = {f"n{i}": {"org": f"org-{i}", "data-dir": str(demo_data / f"org-{i}")} for i in (1, 2, 3)}
    approval = {name: tmp_path / "approval" / cfg["org"] for name, cfg in orgs.items()}
    node_env = {name: approving_env(cfg["org"], approval[name]) for name, cfg in orgs.items()}
    config = {"base-model": str(tiny_model), "resolution": 32, "num-server-rounds": 1, "local-steps": 2,
              "batch-size": 4, "heldout-fraction": 0.25, "eval-timesteps": 2, "sample-every": 0,
              "output-dir": str(tmp_path / "out"), "node-wait-timeout": 20, "round-timeout": 300}

    def run(fed: LocalFederation, app_dir: Path) -> tuple[str, str]:
        """How the run ended, and its ServerApp's log."""
        result = fed.flwr("run", str(app_dir), "local", "--stream", "--run-config", kv(config), timeout=900)
        print(result.stdout[-3000:], result.stderr[-2000:])
        return fed.last_run_status(), result.stdout

    return orgs, approval, node_env, run


@pytest.mark.federation
def test_only_bundles_every_organisation_approved_run(tmp_path, tls, tiny_model, demo_data):
    orgs, approval, node_env, run = _federation_settings(tmp_path, tiny_model, demo_data)
    marker = tmp_path / "marker"
    modified_dir = app_tree(tmp_path / "modified-app", marker=marker)
    modified = fab_of(modified_dir)

    with LocalFederation(tmp_path / "fed", tls, orgs, node_env=node_env) as fed:
        # 1. Nobody approved the modified bundle: every organisation refuses it, and none of it runs.
        status, serverapp = run(fed, modified_dir)
        assert status != "finished:completed"
        for name, cfg in orgs.items():
            log = fed.log(name)
            assert f"{cfg['org']} refused app bundle sha256:{sha(modified)}" in log, log[-3000:]
            assert f"make approve-bundle FAB={sha(modified)}" in log
            assert (approval[name] / "refused" / f"{sha(modified)}.fab").read_bytes() == modified
        assert not marker.exists()
        # The coordinator sees each organisation refuse, with the hash and the command.
        for cfg in orgs.values():
            assert f"{cfg['org']} refused app bundle sha256:{sha(modified)}" in serverapp, serverapp[-3000:]
        assert f"make approve-bundle FAB={sha(modified)}" in serverapp

        # 2. Every organisation reviews the bundle it kept and approves it: the same run completes.
        for name in orgs:
            assert bundles.main(["--approval-dir", str(approval[name]), "approve", sha(modified)]) == 0
        assert run(fed, modified_dir)[0] == "finished:completed"
        assert marker.read_text() == "the bundle ran"


@pytest.mark.federation
def test_a_node_refuses_bytes_that_do_not_match_the_hash_stated_for_them(tmp_path, tls, tiny_model, demo_data):
    """org-3's SuperNode hands its ClientApp the modified app's bytes under the shipped app's hash: refused,
    though both bundles are approved there."""
    orgs, approval, node_env, run = _federation_settings(tmp_path, tiny_model, demo_data)
    marker = tmp_path / "marker"
    modified = fab_of(app_tree(tmp_path / "modified-app", marker=marker))
    shipped_dir = app_tree(tmp_path / "shipped-app")
    for content in (fab_of(shipped_dir), modified):
        (tmp_path / "x.fab").write_bytes(content)
        for name in orgs:
            bundles.main(["--approval-dir", str(approval[name]), "approve", str(tmp_path / "x.fab")])
    shipped = fab_of(shipped_dir)
    (tmp_path / "modified.fab").write_bytes(modified)

    class Tampered(LocalFederation):
        def start_supernode(self, name, **kwargs):
            if name == "n3":
                kwargs["command"] = _tampering_supernode(tmp_path / "modified.fab")
            return super().start_supernode(name, **kwargs)

    with Tampered(tmp_path / "fed", tls, orgs, node_env=node_env) as fed:
        status, serverapp = run(fed, shipped_dir)
        log = fed.log("n3")
        assert f"org-3 refused app bundle sha256:{sha(modified)}: its bytes do not match the hash stated for it " \
               f"({sha(shipped)})" in log, log[-4000:]
        assert "org-3 refused app bundle" in serverapp
        assert status != "finished:completed"
        assert not marker.exists()
