"""A real Flower federation on loopback: one TLS SuperLink, N SuperNodes, the `flwr` CLI.

Used by the end-to-end tests and by the benchmark; nothing here is a mock.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Flower's SuperNode as the image starts it: made to answer every message it took.
SUPERNODE = [sys.executable, str(REPO / "docker" / "supernode.py")]


# Flower's CLIs refuse port 0: a test picks a free port, and starts again on another where the
# process lost it to someone else in between (uvicorn: "[Errno 98] ... address already in use").
PORT_IN_USE, PORT_TRIES = "address already in use", 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def kv(config: dict) -> str:
    """Flower's 'k=v k2=v2' syntax with TOML values."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def image_flower_env() -> dict[str, str]:
    """The FLWR_* settings the images run Flower with (docker/Dockerfile's ENV), so that the loopback
    federation polls and behaves as the deployed one does."""
    pairs = re.findall(r"^\s*(?:ENV\s+)?(FLWR_[A-Z_]+)=(\S+?)\s*\\?$", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    return {k: v for k, v in pairs if k != "FLWR_HOME"}  # FLWR_HOME: the harness keeps its own per federation


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(image_flower_env())
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra)
    return env


def approving_env(org: str, approval: Path) -> dict[str, str]:
    """A node's environment as the app image gives it: docker/bin's bundle-approval wrappers first on
    PATH (Flower's SuperExec starts flwr-clientapp by name), reading `approval`/approved-bundles.txt."""
    return {"PATH": f"{REPO / 'docker' / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}", "ORG": org,
            "APPROVED_BUNDLES": str(approval / "approved-bundles.txt"), "REFUSED_BUNDLES_DIR": str(approval / "refused")}


def load_module(name: str, path: Path):
    """A script outside the app package (certs/, docker/) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_node_key(path: Path) -> Path:
    """An organisation's node key pair, made by the tool `make org-key` runs: PATH and PATH.pub."""
    return load_module("node_key", REPO / "certs" / "node_key.py").create(path.parent, path.stem)[0]


class LocalFederation:
    """SuperNode authentication is on, as in the Compose stack: every node has its own key,
    registered under its organisation's name with docker/orgs.py (what `make register-org` runs)."""

    def __init__(self, workdir: Path, certs: Path, nodes: dict[str, dict], threads_per_node: int = 1,
                 guard: bool = True, node_env: dict[str, dict[str, str]] | None = None, node_nice: int = 0) -> None:
        self.workdir, self.certs, self.nodes = workdir, certs, nodes
        # Many nodes on one host: niced, they leave the coordinator the CPU it has on its own host.
        self.node_nice = node_nice
        # guard=False: Flower's own flower-superlink, only to show what the Fleet guard refuses.
        self.guard = guard
        # Several CPU nodes share this machine's cores: torch's default of one thread per core in
        # every node oversubscribes them many times over.
        self.node_env = {"OMP_NUM_THREADS": str(threads_per_node)}
        self.node_envs = node_env or {}  # more environment, by node name
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.flwr_home = workdir / "flwr-home"
        self.env = offline_env()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.log", "wb")
        if name in self.nodes and self.node_nice:
            args = ["nice", "-n", str(self.node_nice), *args]  # inherited by every process the node starts
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env | (env or {}), cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def _listening(self, name: str, port: int, timeout: float = 60) -> bool:
        """Wait until process `name` serves on `port`: False if it exited because the port was taken
        meanwhile. Read from its log (uvicorn's line), not by connecting: whoever took the port
        would accept the connection too."""
        serving = re.compile(rf"Uvicorn running on https?://\S+:{port}\b")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log(name)
            if serving.search(log):
                return True
            if self.procs[name].poll() is not None:
                if PORT_IN_USE in log:
                    return False
                raise RuntimeError(f"{name} exited:\n{log}")
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not open port {port}:\n{self.log(name)}")

    def start_superlink(self) -> None:
        # As the image starts it: flower-superlink behind the Fleet guard (docker/superlink.py).
        launcher = [sys.executable, str(REPO / "docker" / "superlink.py")] if self.guard else [str(BIN / "flower-superlink")]
        for _ in range(PORT_TRIES):
            self._spawn("superlink", [
                *launcher, "--port", str(self.port),
                "--ssl-ca-certfile", str(self.certs / "ca.pem"), "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key"), "--database", str(self.workdir / "state.db"),
                "--disable-runtime-dependency-installation", "--enable-supernode-auth",
            ])
            if self._listening("superlink", self.port):
                return
            self.port = free_port()
        raise RuntimeError(f"no free port for the SuperLink after {PORT_TRIES} tries")

    def key(self, name: str) -> Path:
        path = self.workdir / "keys" / f"{name}.key"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            write_node_key(path)
        return path

    def orgs(self, *args: str) -> subprocess.CompletedProcess:
        """docker/orgs.py on this federation's connection."""
        return subprocess.run([sys.executable, str(REPO / "docker" / "orgs.py"), "local", *args], cwd=REPO,
                              env=self.env | {"FLWR_HOME": str(self.flwr_home)}, capture_output=True, text=True,
                              timeout=120)

    def start_supernode(self, name: str, root_certificates: Path | None = None, key: Path | None = None,
                        register_as: str | None = None, register: bool = True,
                        env: dict[str, str] | None = None, command: list[str] | None = None) -> subprocess.Popen:
        """Node `name` with its own key (or `key`), first registered as its org (or `register_as`);
        `env`: more environment for it (and the SuperExec and ClientApp processes it starts);
        `command` instead of the SuperNode the image starts (SUPERNODE; its arguments follow)."""
        key = key or self.key(name)
        if register:
            org = register_as or self.nodes[name]["org"]
            ensured = self.orgs("ensure", org, str(key.with_suffix(".pub")))
            assert ensured.returncode == 0, ensured.stdout + ensured.stderr
        for _ in range(PORT_TRIES):
            port = free_port()
            proc = self._spawn(name, [
                *(command or SUPERNODE), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(root_certificates or self.certs / "ca.pem"),
                "--auth-supernode-private-key", str(key),
                "--port", str(port), "--node-config", kv(self.nodes[name]), "--max-retries", "3",
            ], env=self.node_env | self.node_envs.get(name, {}) | (env or {}))
            # Its own API opens before it contacts the SuperLink: a node that is refused later still
            # opens it first.
            try:
                if self._listening(name, port):
                    return proc
            except RuntimeError:
                return proc  # exited for another reason (a refused node): the test reads its log
        raise RuntimeError(f"no free port for SuperNode {name} after {PORT_TRIES} tries")

    def __enter__(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_superlink()
            self.flwr_home.mkdir(exist_ok=True)
            (self.flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
                f'root-certificates = "{self.certs / "ca.pem"}"\ninsecure = false\n'
            )
            for name in self.nodes:
                self.start_supernode(name)
        except BaseException:  # a failed or interrupted start leaves no process behind
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=self.env | {"FLWR_HOME": str(self.flwr_home)},
                              capture_output=True, text=True, timeout=timeout)

    def run_app(self, run_config: dict, timeout: float = 900) -> subprocess.CompletedProcess:
        """`flwr run . local --stream`: blocks until the run ends, output is the ServerApp log.

        `flwr run --stream` exits 0 even when the ServerApp failed: check `last_run_status()`."""
        return self.flwr("run", ".", "local", "--stream", "--run-config", kv(run_config), timeout=timeout)

    def last_run_status(self) -> str:
        runs = json.loads(self.flwr("ls", "local", "--format", "json").stdout)["runs"]
        return max(runs, key=lambda r: r["pending-at"])["status"]
