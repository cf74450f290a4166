"""Flower's `flwr-clientapp` and `flwr-agentapp`, with this organisation's app-bundle approval in front.

A run's code is the app bundle (FAB) the coordinator submitted. Flower's SuperExec starts one
`flwr-clientapp` (or, for an AgentApp bundle, `flwr-agentapp`) process per message, by bare name
from PATH (flwr/supercore/constant.py TASK_TYPE_TO_COMMAND). The image puts docker/bin/ first on
PATH, so these run instead; each runs Flower's own entry point with two changes at the one place
where the bundle becomes code, `install_from_fab` (called by run_clientapp and run_agentapp):

- The bytes received are hashed (SHA-256). They must match the hash the SuperNode states for the
  bundle, and the organisation's approved list (APPROVED_BUNDLES, a file the organisation keeps,
  mounted read-only). Otherwise nothing of the bundle is installed or imported: the install raises,
  and Flower answers the message with an error naming the hash and the command that approves it.
  The refused bundle is kept for review in REFUSED_BUNDLES_DIR/<sha256>.fab.
- The approved bundle is installed afresh into a directory of this process only (FLWR_HOME points
  there), read-only, and removed when the process exits: Flower would otherwise reuse an earlier
  install of the same hash from its cache without checking it, which a run's code could have
  changed. (app/trainer.py starts the warm trainer from a copy of this install for the same reason.)

tests/test_approval.py pins every Flower internal this relies on.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")
# The command an organisation runs to approve; APPROVE_HINT_ARGS adds to it where the list is not the
# join kit's (the demo's silos).
APPROVE_COMMAND = "make approve-bundle FAB={sha256}"
# The SuperExec's commands that run a bundle's code on a node, and the module of each where Flower
# turns the received bundle into code (install_from_fab). tests/test_approval.py pins both.
GUARDED_MODULES = {"flwr-clientapp": "flwr.supernode.runtime.run_clientapp",
                   "flwr-agentapp": "flwr.supercore.task_process.agent.run_agentapp"}
COMMANDS = tuple(GUARDED_MODULES)
HOME_PREFIX = "fedlora-app-"


class BundleRefused(RuntimeError):
    """This organisation did not approve the bundle; none of its code ran."""


def approved_hashes(path: Path) -> set[str]:
    """The hashes in an approved list: one per line, first field; '#' starts a comment."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    hashes = set()
    for line in text.splitlines():
        field = line.split("#", 1)[0].split()
        if field and SHA256.fullmatch(field[0].lower()):
            hashes.add(field[0].lower())
    return hashes


def _log(message: str) -> None:
    # Into the SuperNode's output, which is the organisation's log (Flower logs the raise too).
    print(f"[bundle approval] {message}", file=sys.stderr, flush=True)


class Guard:
    """One process's check. `stated` collects the hashes the SuperNode states for the bundles it hands
    over (Flower's fab_from_proto); `install` is what Flower calls instead of install_from_fab."""

    def __init__(self, install_from_fab, approved: Path, refused_dir: Path | None, home: Path) -> None:
        self._install = install_from_fab
        self.approved, self.refused_dir, self.home = approved, refused_dir, home
        self.stated: list[str] = []

    def fab_from_proto(self, original):
        def fab_from_proto(proto):
            fab = original(proto)
            self.stated.append(fab.hash_str)
            return fab
        return fab_from_proto

    def install(self, fab_file, install_dir=None, skip_prompt=False):
        content = fab_file.read_bytes() if isinstance(fab_file, Path) else fab_file
        if not isinstance(content, bytes):
            raise BundleRefused(f"refused an app bundle given as {type(content).__name__}, not bytes")
        sha = hashlib.sha256(content).hexdigest()
        org = os.environ.get("ORG", "this organisation")
        mismatched = [s for s in self.stated if s != sha]
        if mismatched:
            self._refuse(content, sha, f"{org} refused app bundle sha256:{sha}: its bytes do not match the hash "
                                       f"stated for it ({mismatched[0]}). None of its code ran")
        if sha not in approved_hashes(self.approved):
            approve = " ".join([APPROVE_COMMAND.format(sha256=sha), *os.environ.get("APPROVE_HINT_ARGS", "").split()])
            self._refuse(content, sha, f"{org} refused app bundle sha256:{sha}: not in its approved list. None of its "
                                       "code ran; the bundle is kept on the node for review. To let it run, the "
                                       f"organisation runs `{approve}`", f"approved list: {self.approved}")
        path = self._install(content, install_dir=install_dir, skip_prompt=skip_prompt)
        _read_only(self.home)
        _log(f"app bundle sha256:{sha} is approved; installed afresh in {path}")
        return path

    def _refuse(self, content: bytes, sha: str, why: str, local: str = ""):
        """Keep the bundle and raise `why`, which reaches the coordinator; paths go to this node's log only."""
        notes = [local] if local else []
        if self.refused_dir is None:
            notes.append("not kept: REFUSED_BUNDLES_DIR is not set")
        else:
            kept = self.refused_dir / f"{sha}.fab"
            try:
                if not kept.exists():
                    self.refused_dir.mkdir(parents=True, exist_ok=True)
                    tmp = kept.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(content)
                    tmp.replace(kept)
                notes.append(f"kept in {kept}")
            except OSError as err:
                notes.append(f"could not keep it in {kept}: {err}")
        _log(f"{why} ({'; '.join(notes)})")
        raise BundleRefused(why)


def _read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


def _remove(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def _sweep(tmp: Path) -> None:
    """Remove the install homes of processes that ended without removing theirs (killed)."""
    for home in tmp.glob(f"{HOME_PREFIX}*-*"):
        try:
            os.kill(int(home.name[len(HOME_PREFIX):].split("-")[0]), 0)
        except ProcessLookupError:
            _remove(home)
        except (ValueError, PermissionError, OSError):
            pass


def install_guard(guard: Guard, commands=COMMANDS) -> list[object]:
    """Put the guard where Flower's processes for `commands` install and read bundles; returns the
    modules changed."""
    # By module path: the packages re-export the functions under the same names.
    modules = [importlib.import_module(GUARDED_MODULES[c]) for c in commands]
    for module in modules:
        module.fab_from_proto = guard.fab_from_proto(module.fab_from_proto)
        module.install_from_fab = guard.install
    return modules


def entry_point(command: str):
    """What Flower's own `command` executable runs: its console script of that name."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="console_scripts", name=command) if ep.dist and ep.dist.name == "flwr"]
    if command not in COMMANDS or len(found) != 1:
        raise SystemExit(f"bundle_guard: {command!r} is not one of Flower's {', '.join(COMMANDS)}")
    return found[0].load()


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    from flwr.cli.install import install_from_fab

    entry = entry_point(command)
    _sweep(Path(tempfile.gettempdir()))
    home = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-"))
    try:
        os.environ["FLWR_HOME"] = str(home)  # Flower reads it at each install and load
        # Set in the image (docker/Dockerfile); unset, nothing is approved.
        approved = Path(os.environ.get("APPROVED_BUNDLES", "/nonexistent/approved-bundles.txt"))
        refused = os.environ.get("REFUSED_BUNDLES_DIR")
        install_guard(Guard(install_from_fab, approved, Path(refused) if refused else None, home), [command])
        sys.argv = [command, *args]
        entry()
    finally:
        _remove(home)


if __name__ == "__main__":
    main(sys.argv[1:])
