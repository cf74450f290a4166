"""Warm nodes: a long-lived trainer per organisation keeps the base model and the latents loaded.

Flower 1.41 starts a fresh ClientApp process for every message. Left to itself, every training or
evaluation message would import torch and diffusers, initialise CUDA, load the UNet and read the
latent cache again: seconds on a CPU, more on a GPU, on every node in every round. Instead the
ClientApp hands prepare, fit and evaluate to its organisation's trainer over a Unix socket in the
node's cache directory, and starts that trainer when none answers:

- The run's code trains. The ClientApp starts the trainer from a copy of the directory it was itself
  loaded from (the run's app bundle): the node installs each message's bundle afresh and removes
  that install when the ClientApp exits (docker/bundle_guard.py), and the trainer and its workers
  outlive it; the trainer deletes its copy when it exits. Every request carries the hash of the ClientApp's code and the
  trainer refuses one that differs from its own, so a trainer of other code is never used: the
  ClientApp replaces it. A ClientApp that starts a trainer tells its organisation's trainers of
  other code to exit.
- One organisation. The socket's name holds the organisation, the code hash and the node's
  train-processes setting; the socket is 0600 in a 0700 directory of the node's user; the trainer
  refuses requests for another organisation.
- The same computation. The trainer runs app/training.py's prepare, local_update and measure with
  its `Resident` model and latents where the ClientApp would load them (`FromDisk`). Node setting
  warm-trainer=false runs them in the ClientApp, as every message did before.
- A failure stays one message's. A trainer that dies mid-request fails that message with an
  error naming its log; the next message starts a fresh trainer. An error raised by the
  computation is sent back and raised in the ClientApp.
- Memory is given back. One model and one set of latents stay resident; other settings replace
  them. The trainer exits after `warm-trainer-idle` seconds without a message, when the process
  that runs the node's ClientApps exits, or when told to.
- Every GPU trains. With node setting train-processes (default "auto": one per visible GPU) above 1,
  the trainer is rank 0 of that many data-parallel training processes, started with it and gone
  with it (app/parallel.py); a dead one fails the message it was in, and the trainer exits.

The wire: a frame is two 8-byte lengths, a JSON header and an .npz of arrays (read with
allow_pickle=False: no pickles cross the socket). A request is one frame. The trainer answers
"accepted", then "log" frames while it works (the ClientApp writes them into the SuperNode's
log), then one "reply" or "error".

The ClientApp's side imports neither torch nor diffusers: that is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from .config import ConfigError, NodeConfig, RunConfig
from .training import Resident

APP_DIR = Path(__file__).resolve().parent
# Seconds a new trainer may take to open its socket (it imports torch afterwards, while the
# first request waits on the socket).
START_TIMEOUT = 60.0
# How often an idle trainer looks at its clock and at the process it watches.
POLL_SECONDS = 2.0
# Seconds a trainer of other code gets to leave when asked, before it is killed.
REPLACE_TIMEOUT = 10.0
# Set in a trainer started from its own copy of the app (Connection._spawn): the folder it removes at exit.
_COPY_ENV = "FEDLORA_TRAINER_APP_COPY"
_LENGTHS = struct.Struct("!QQ")
_MAX_HEADER = 64 * 2**20

class TrainerCrashed(RuntimeError):
    """The trainer died with this message's work in it (or could not start)."""


class TrainerError(RuntimeError):
    """The computation raised in the trainer; the message names the original error."""


def code_hash(app_dir: Path = APP_DIR) -> str:
    """What identifies the code that trains: the app's Python files, as the app bundle carries them."""
    h = hashlib.sha256()
    for path in sorted(app_dir.rglob("*.py")):
        h.update(path.relative_to(app_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _org_tag(org: str) -> str:
    # A fixed-length tag of safe characters: the organisation's name comes from the node's settings.
    return hashlib.sha256(org.encode()).hexdigest()[:12]


# --- The wire ------------------------------------------------------------------------------------

def send(sock: socket.socket, header: dict, arrays=()) -> None:
    payload = b""
    if len(arrays):
        buf = io.BytesIO()
        np.savez(buf, *[np.asarray(a) for a in arrays])
        payload = buf.getvalue()
    head = json.dumps(header, default=float).encode()
    sock.sendall(_LENGTHS.pack(len(head), len(payload)) + head)
    if payload:  # even an empty send fails once the reader has gone
        sock.sendall(payload)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("connection closed")
        got += k
    return bytes(buf)


def receive(sock: socket.socket) -> tuple[dict, list[np.ndarray]]:
    head_len, payload_len = _LENGTHS.unpack(_exactly(sock, _LENGTHS.size))
    if head_len > _MAX_HEADER:
        raise ValueError(f"frame header of {head_len} bytes: not this protocol")
    header = json.loads(_exactly(sock, head_len))
    arrays = []
    if payload_len:
        with np.load(io.BytesIO(_exactly(sock, payload_len)), allow_pickle=False) as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return header, arrays


@contextlib.contextmanager
def _address(path: Path):
    """A name for `path` that fits a Unix socket address (107 bytes), however deep the cache directory."""
    if len(os.fsencode(path)) <= 100 or not Path("/proc/self/fd").is_dir():
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            sock.connect(address)
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def process_started_at() -> float | None:
    """Unix time this process started (Linux), for the time-to-first-step figure."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# --- The ClientApp's side ------------------------------------------------------------------------

class _OtherTrainer(Exception):
    def __init__(self, header: dict) -> None:
        super().__init__(header)
        self.header = header


class _Gone(Exception):
    """The trainer closed the connection before it took the request (it was exiting)."""


def connection(node: NodeConfig, run_config, node_config, watch_pid: int | None = None) -> Connection | None:
    """The node's warm trainer for this message, or None where the ClientApp works in process."""
    return Connection(node, run_config, node_config, watch_pid) if node.warm_trainer else None


class Connection:
    """One message's requests to its organisation's trainer, which it starts when none answers."""

    def __init__(self, node: NodeConfig, run_config, node_config, watch_pid: int | None = None) -> None:
        self.created = time.time()  # the message has reached the app
        self.node, self.run_config, self.node_config = node, dict(run_config), dict(node_config)
        self.code = code_hash()
        self.dir = node.cache_dir / "trainers"
        tag = _org_tag(node.org)
        # The setting shapes the trainer's processes at its start: another value is another trainer.
        self.processes = str(node.train_processes or "auto")
        self.path = self.dir / f"{tag}-{self.code[:16]}-{self.processes}.sock"
        self.log_path = self.dir / f"{tag}.log"
        # The trainer outlives this process, not the one that runs the node's ClientApps.
        self.watch_pid = watch_pid or os.getppid()
        self.pid: int | None = None
        self.last_reply: dict | None = None  # the trainer's pid and counters, for tests and the log

    def prepare(self, cfg: RunConfig) -> dict:
        return self.request("prepare", {}, (), cfg.prepare_timeout)[0]["result"]

    def fit(self, cfg: RunConfig, global_arrays, rnd: int):
        t0 = time.perf_counter()
        header, update = self.request("fit", {"round": rnd}, global_arrays, cfg.round_timeout)
        report = header["result"]["report"]
        # What this message cost the node, trainer start and model load included.
        report["fit_seconds"] = time.perf_counter() - t0
        return update, header["result"]["num_examples"], report

    def evaluate(self, cfg: RunConfig, global_arrays, rnd):
        t0 = time.perf_counter()
        result = self.request("evaluate", {"round": rnd}, global_arrays, cfg.round_timeout)[0]["result"]
        result["report"]["eval_seconds"] = time.perf_counter() - t0
        return result["loss"], result["num_examples"], result["report"]

    def request(self, op: str, fields: dict, arrays, timeout: float) -> tuple[dict, list[np.ndarray]]:
        header = {"op": op, "code": self.code, "org": self.node.org, "run_config": self.run_config,
                  "node_config": self.node_config, **fields}
        for attempt in range(3):
            sock = self._connect()
            try:
                with sock:
                    sock.settimeout(timeout)
                    try:
                        send(sock, header, arrays)
                    except ConnectionError:
                        raise _Gone() from None
                    reply, out = self._replies(sock, op, timeout)
                self.last_reply = reply
                self._note(op, reply)
                return reply, out
            except _Gone:
                continue  # it was exiting (idle) as this message arrived: a fresh one takes it
            except _OtherTrainer as other:
                if other.header.get("org") != self.node.org or attempt:
                    raise RuntimeError(
                        f"[{self.node.org}] refusing the trainer at {self.path} (pid {other.header.get('pid')}, "
                        f"organisation {other.header.get('org')!r}, code {str(other.header.get('code'))[:16]}): this "
                        f"run's code is {self.code[:16]}. Stop that process") from None
                self._replace(other.header["pid"], other.header.get("code", ""))
        raise TrainerCrashed(f"[{self.node.org}] the warm trainer at {self.path} closed the connection three times "
                             f"without taking the request: see {self.log_path} on the node")

    def _replies(self, sock: socket.socket, op: str, timeout: float) -> tuple[dict, list[np.ndarray]]:
        while True:
            try:
                header, arrays = receive(sock)
            except (EOFError, ConnectionError) as err:
                if self.pid is None:
                    raise _Gone() from None
                raise self._crashed(op, err) from None
            except TimeoutError:
                # Hung (or far slower than the round allows): it would hold up the next message too.
                if self.pid:
                    _kill(self.pid)
                raise TimeoutError(f"[{self.node.org}] the warm trainer (pid {self.pid}) did not finish {op} within "
                                   f"{timeout:g} s; it was stopped, the next message starts a fresh one") from None
            kind = header["type"]
            if kind == "accepted":
                self.pid = header["pid"]
            elif kind == "log":
                log(header["level"], "%s", header["message"])
            elif kind == "refused":
                raise _OtherTrainer(header)
            elif kind == "error":
                raise _raised(header)
            elif kind == "reply":
                return header, arrays
            else:
                raise TrainerCrashed(f"[{self.node.org}] unexpected frame {kind!r} from the warm trainer")

    def _crashed(self, op: str, err: Exception) -> TrainerCrashed:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            tail = []
        # The tail stays in this node's log: the error itself reaches the coordinator.
        log(ERROR, "[%s] the warm trainer (pid %s) died during %s (%s); the end of its log %s:\n%s", self.node.org,
            self.pid, op, err, self.log_path, "\n".join(tail))
        return TrainerCrashed(
            f"[{self.node.org}] the node's warm trainer (pid {self.pid}) died during {op}; its log is {self.log_path} on "
            "the node. The next message starts a fresh trainer (node setting warm-trainer=false trains in the ClientApp)")

    def _note(self, op: str, reply: dict) -> None:
        counts, started = reply["counts"], reply.get("training_started_at")
        timing = ""
        if started:
            timing = f"; first training step {started - self.created:.2f} s after the message reached the app"
            process = process_started_at()
            if process:
                timing += f", {started - process:.2f} s after its process started"
            timing += f" (held-out evaluation {reply['result']['report']['eval_seconds']:.2f} s of it)"
        log(INFO, "[%s] %s on warm trainer pid %d (model loads %d, data loads %d, message %d)%s", self.node.org, op,
            reply["pid"], counts["model_loads"], counts["data_loads"], counts["requests"], timing)

    def _private_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.dir.stat()
        if st.st_uid != os.getuid():
            raise ConfigError(f"{self.dir} belongs to uid {st.st_uid}, not to this node's user ({os.getuid()}): its "
                              "warm trainer's socket must be private. Give the node its own cache-dir")
        if st.st_mode & 0o077:
            self.dir.chmod(0o700)

    def _connect(self) -> socket.socket:
        self.pid = None
        self._private_dir()
        sock = _try_connect(self.path)
        if sock:
            return sock
        self._retire_others()
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_suffix(".log.1"))  # the last one's, e.g. after a crash
        proc = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while (sock := _try_connect(self.path)) is None:
            status = proc.poll()
            if status not in (None, 0) or time.monotonic() > deadline:
                raise TrainerCrashed(f"[{self.node.org}] the warm trainer did not start (exit status {status}): "
                                     f"see {self.log_path} on the node")
            if status == 0:
                # It found the lock taken: by a trainer that is starting (its socket comes), or by
                # one on its way out (its socket is gone already); then the next one gets the lock.
                time.sleep(0.2)
                if not self.path.exists():
                    proc = self._spawn()
            time.sleep(0.05)
        return sock

    def _spawn(self) -> subprocess.Popen:
        copy = Path(tempfile.mkdtemp(prefix="fedlora-trainer-"))
        shutil.copytree(APP_DIR, copy / APP_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
        with open(self.log_path, "ab") as out:
            # A session of its own: it is nobody's process group, so it outlives this message.
            return subprocess.Popen(
                [sys.executable, "-m", "app.trainer", "--socket", str(self.path), "--org", self.node.org,
                 "--idle", repr(self.node.warm_trainer_idle), "--watch-pid", str(self.watch_pid),
                 "--train-processes", self.processes],
                cwd=copy, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1", _COPY_ENV: str(copy)})

    def _retire_others(self) -> None:
        """Ask this organisation's trainers of other code to exit (after their current request)."""
        for path in self.dir.glob(f"{_org_tag(self.node.org)}-*.sock"):
            if path != self.path and (sock := _try_connect(path)):
                with sock:
                    try:
                        sock.settimeout(2)
                        send(sock, {"op": "exit", "org": self.node.org, "code": self.code})
                    except OSError:
                        pass

    def _replace(self, pid: int, other_code: str) -> None:
        log(WARNING, "[%s] the trainer at %s runs other code (%s, this run's is %s): replacing it", self.node.org,
            self.path, other_code[:16], self.code[:16])
        if (sock := _try_connect(self.path)):
            with sock:
                send(sock, {"op": "exit", "org": self.node.org, "code": self.code})
        deadline = time.monotonic() + REPLACE_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            _kill(pid)


def _raised(header: dict) -> Exception:
    """The trainer's error as the ClientApp raises it; the app's own errors keep their type."""
    from .data import DataError

    if header["error_type"] == "DataError":
        return DataError(header["message"], header.get("names", ""))
    if header["error_type"] == "ConfigError":
        return ConfigError(header["message"])
    return TrainerError(f"{header['error_type']}: {header['message']}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- The trainer's side --------------------------------------------------------------------------

class _Forward(logging.Handler):
    """Sends the trainer's log lines to the ClientApp while a request runs."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__()
        self.conn: socket.socket | None = conn
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        # The request's own lines: another thread's frame could land in the middle of one of its own.
        if self.conn is None or record.thread != self.thread:
            return
        try:
            send(self.conn, {"type": "log", "level": record.levelno, "message": record.getMessage()})
        except OSError:
            self.conn = None  # the ClientApp is gone; the work finishes for nobody


def _compute(header: dict, arrays: list[np.ndarray], resident: Resident) -> tuple[dict, list[np.ndarray]]:
    from . import model, training

    cfg = RunConfig.from_flower(header["run_config"])
    node = NodeConfig.from_flower(header["node_config"], header["run_config"])
    resident.settings = (header["run_config"], header["node_config"])
    if resident.refusal and header["op"] in ("prepare", "fit"):
        raise ConfigError(resident.refusal)
    if resident.group and header["op"] in ("prepare", "fit"):
        # At prepare already: the coordinator then leaves the organisation out with this message.
        model.batch_part(cfg.batch_size, resident.group.size, 0)
    if header["op"] == "prepare":
        return {"result": training.prepare(cfg, node, resident)}, []
    if header["op"] == "fit":
        update, num_examples, report = training.local_update(cfg, node, arrays, header["round"], resident)
        return {"result": {"num_examples": num_examples, "report": report}}, update
    if header["op"] == "evaluate":
        loss, num_examples, report = training.measure(cfg, node, arrays, header["round"], resident)
        return {"result": {"loss": loss, "num_examples": num_examples, "report": report}}, []
    raise ValueError(f"unknown request {header['op']!r}")


def _serve_one(conn: socket.socket, org: str, code: str, resident: Resident) -> bool:
    """Answer one connection; returns False when the trainer should exit."""
    import torch

    from .data import DataError
    from .model import ModelNotAvailable, NonFiniteLoss

    conn.settimeout(30)  # the request follows the connection at once
    try:
        header, arrays = receive(conn)
    except (EOFError, OSError, ValueError):
        return True
    if not isinstance(header, dict):
        return True
    conn.settimeout(None)
    if header.get("org") != org:
        send(conn, {"type": "refused", "pid": os.getpid(), "org": org, "code": code})
        return True
    if header.get("op") == "exit":
        log(INFO, "asked to exit by a ClientApp of code %s", str(header.get("code"))[:16])
        return False
    if header.get("code") != code:
        log(WARNING, "refused a request from code %s (this trainer runs %s)", str(header.get("code"))[:16], code[:16])
        send(conn, {"type": "refused", "pid": os.getpid(), "org": org, "code": code})
        return True
    resident.counts["requests"] += 1
    resident.training_started_at = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # each round reports its own peak
    send(conn, {"type": "accepted", "pid": os.getpid()})
    forward = _Forward(conn)
    logging.getLogger("flwr").addHandler(forward)
    try:
        reply, out = _compute(header, arrays, resident)
    except Exception as err:  # noqa: BLE001 - every error goes back to the message that caused it
        logging.getLogger("flwr").removeHandler(forward)
        expected = (DataError, ConfigError, NonFiniteLoss, ModelNotAvailable)
        log(ERROR if not isinstance(err, expected) else INFO, "%s failed: %s: %s", header["op"], type(err).__name__,
            getattr(err, "detail", err), exc_info=not isinstance(err, expected))
        if not isinstance(err, expected):
            resident.forget()  # whatever went wrong, the next message starts from disk
        # A DataError's file names travel apart from its message, to the ClientApp's (the node's) log only.
        _send_quietly(conn, {"type": "error", "error_type": type(err).__name__, "message": str(err),
                             "names": getattr(err, "names", "")})
        return True
    logging.getLogger("flwr").removeHandler(forward)
    _send_quietly(conn, {"type": "reply", "pid": os.getpid(), "counts": resident.counts,
                         "training_started_at": resident.training_started_at, **reply}, out)
    return True


def _send_quietly(conn: socket.socket, header: dict, arrays=()) -> None:
    try:
        send(conn, header, arrays)
    except OSError as err:
        log(WARNING, "the ClientApp left before the %s (%s)", header["type"], err)


def serve(path: Path, org: str, idle: float, watch_pid: int | None = None, train_processes: int | None = None) -> int:
    os.umask(0o077)
    # Held for life (the OS releases it even on SIGKILL): one trainer per socket.
    lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another trainer of this code and organisation is starting or serving
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _address(path) as address:
        server.bind(address)
    server.listen(16)
    server.settimeout(POLL_SECONDS)
    t0 = time.perf_counter()
    from . import model, parallel, training  # noqa: F401 - the imports every message would pay, paid once
    # Hashed after importing: this is the code that will run.
    code = code_hash()
    log(INFO, "warm trainer of %s: pid %d, code %s from %s, socket %s (imports %.1f s)", org, os.getpid(), code[:16],
        APP_DIR, path, time.perf_counter() - t0)
    resident, last, reason = Resident(), time.monotonic(), "asked to"
    try:
        try:
            resident.group = parallel.Group.start(train_processes)
        except ConfigError as err:
            log(ERROR, "%s", err)
            resident.refusal = str(err)
        while True:
            if resident.group and resident.group.failed:
                reason = resident.group.failed
                break
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if time.monotonic() - last > idle:
                    reason = f"idle for {idle:g} s"
                    break
                if watch_pid and not _alive(watch_pid):
                    reason = f"process {watch_pid} (the node's) exited"
                    break
                continue
            with conn:
                if not _serve_one(conn, org, code, resident):
                    break
            last = time.monotonic()
    finally:
        # Gone from the directory before it closes: nobody connects to a trainer that is leaving.
        path.unlink(missing_ok=True)
        server.close()
        if resident.group:
            resident.group.close()
    log(INFO, "warm trainer of %s exits: %s", org, reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An organisation's warm trainer; its ClientApp starts it.")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--org", required=True)
    parser.add_argument("--idle", type=float, default=NodeConfig.warm_trainer_idle)
    parser.add_argument("--watch-pid", type=int, help="exit when this process does")
    parser.add_argument("--train-processes", default="auto", help='"auto" (one per GPU) or a number')
    args = parser.parse_args(argv)
    processes = None if args.train_processes == "auto" else int(args.train_processes)  # checked by NodeConfig
    try:
        return serve(args.socket, args.org, args.idle, args.watch_pid, processes)
    finally:
        if os.environ.get(_COPY_ENV) == str(APP_DIR.parent):
            for folder, _, _ in os.walk(APP_DIR.parent):
                os.chmod(folder, 0o700)  # copied from a read-only install
            shutil.rmtree(APP_DIR.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
