"""Every GPU of a node: the warm trainer's training, data-parallel over N processes.

The warm trainer (app/trainer.py) is rank 0. With N > 1 (node setting train-processes; "auto": one
per visible GPU) it starts N-1 worker processes once, at its own start, and they live as long as it
does, each with its own resident model and latents on cuda:<rank>:

- The same update as one process. In each fit every process draws the whole batch (order, noise,
  timesteps) from the same generator and trains on its own contiguous 1/N of it; accelerate's DDP
  averages the gradients, which gives the whole batch's mean gradient, so clipping and Adam take the
  step one process would take (LoraUNet.train). batch-size keeps its meaning, the effective batch,
  and must divide by N; the update equals one process's up to the order of float additions, so the
  SecAgg+ bound (secagg.adam_update_bound: learning rate and step count only) holds unchanged.
- How a fit reaches the workers: rank 0 writes the run's and the node's settings as one JSON line to
  each worker's stdin; each loads the model and latents the way the trainer does (its own Resident,
  from the latent cache rank 0 has just read or filled) and joins the training, which broadcasts rank
  0's weights (the received adapter) first. Held-out evaluation stays on rank 0.
- Workers never outlive rank 0: a worker exits at the end of its stdin (rank 0's end of the pipe
  closes when it exits, SIGKILL included), and a thread exits it as soon as its parent changes (rank
  0 died while the worker waited inside a collective).
- A dead worker fails the message it is in: rank 0's collective fails, the error names the worker,
  and the trainer exits after replying, so that the next message starts a fresh group. A worker whose
  own computation raises exits (nothing else puts the processes back in step), with the same outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.common.logger import log

from .config import ConfigError, NodeConfig, RunConfig

# How often rank 0 looks at its workers, and a worker at its parent.
WATCH_SECONDS = 0.5
# After a worker died, rank 0's collective normally fails at once (gloo) and the trainer replies and
# exits; NCCL may wait instead. Past this, rank 0 exits from the watching thread.
GRACE_SECONDS = 10.0
# Seconds workers get to leave when rank 0 exits, before they are killed.
CLOSE_SECONDS = 10.0


class WorkerDied(RuntimeError):
    """A training process other than rank 0 exited; the trainer cannot train again."""


def processes_for(setting: int | None) -> int:
    """The node setting train-processes resolved on this machine: None ("auto") is one per visible GPU."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting is None:
        return max(1, gpus)
    if gpus and setting > gpus:
        raise ConfigError(f"node setting train-processes={setting}, but this node sees {gpus} GPU(s): give its "
                          f"container more GPUs (compose.gpu.yaml, NODE_GPU in the join kit) or set train-processes "
                          f"to at most {gpus}, or \"auto\"")
    return setting


def _accelerator():
    import torch
    from accelerate import Accelerator

    # Reads RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment: NCCL and cuda:<rank> on GPUs,
    # gloo on CPUs. Precision stays the run's setting (LoraUNet's autocast): accelerate adds none.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trained(accelerator, net, cfg: RunConfig) -> list[dict]:
    """What each process trained and the adapter it ended with, gathered on every process."""
    from accelerate.utils import gather_object

    from .model import batch_part, lora_state, weights_fingerprint

    part = batch_part(cfg.batch_size, accelerator.num_processes, accelerator.process_index)
    return gather_object([{"rank": accelerator.process_index, "pid": os.getpid(), "device": str(net.device),
                           "images": [part.start, part.stop], "steps": cfg.local_steps,
                           "adapter": weights_fingerprint(list(lora_state(net.unet).values()))}])


class Group:
    """Rank 0's side: the worker processes, started once, and the fits it hands them."""

    @classmethod
    def start(cls, setting: int | None) -> Group | None:
        processes = processes_for(setting)
        return cls(processes) if processes > 1 else None

    def __init__(self, processes: int) -> None:
        self.size = processes
        self.failed: str | None = None  # why these processes cannot train again: the trainer exits
        self.closing = False
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(processes),
                           "LOCAL_WORLD_SIZE": str(processes), "RANK": "0", "LOCAL_RANK": "0"})
        # Output into the trainer's log; the run's code, from where the trainer's came.
        self.workers = [subprocess.Popen([sys.executable, "-m", "app.parallel", "--parent", str(os.getpid())],
                                         cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                                         env=os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
                        for rank in range(1, processes)]
        threading.Thread(target=self._watch, daemon=True).start()
        t0 = time.perf_counter()
        self.accelerator = _accelerator()  # waits for every worker to join
        log(INFO, "%d training processes: rank 0 (pid %d) and workers %s, joined in %.1f s (%s)", processes,
            os.getpid(), ", ".join(str(w.pid) for w in self.workers), time.perf_counter() - t0,
            self.accelerator.distributed_type)

    def train(self, net, data, cfg: RunConfig, node: NodeConfig, seed: int, on_step, job: dict) -> dict:
        """LoraUNet.train on every process; `job` holds what a worker needs to load what rank 0 holds."""
        from .model import NonFiniteLoss, batch_part

        batch_part(cfg.batch_size, self.size, 0)  # refused before any worker starts
        line = (json.dumps(job | {"seed": seed}) + "\n").encode()
        try:
            for worker in self.workers:
                worker.stdin.write(line)
                worker.stdin.flush()
            stats = net.train(data, cfg.local_steps, cfg.batch_size, cfg.learning_rate, seed, on_step=on_step,
                              accelerator=self.accelerator)
            ranks = _trained(self.accelerator, net, cfg)
        except NonFiniteLoss:
            raise  # every process stopped at the same step: still in step
        except Exception as err:
            dead = self._dead(wait=5.0)  # a collective fails as soon as a peer's sockets close
            self.failed = dead or f"{type(err).__name__} during training"
            if dead:
                raise WorkerDied(f"[{node.org}] {dead} during training; this trainer exits and the next message "
                                 "starts it again with all its processes") from err
            raise
        if len({r["adapter"] for r in ranks}) != 1:
            self.failed = "the training processes ended with different adapters"
            raise RuntimeError(f"[{node.org}] the training processes ended with different adapters "
                               f"({', '.join(r['adapter'] for r in ranks)}): their updates cannot be trusted")
        log(INFO, "[%s] trained on %d processes: %s; %d steps each, the same adapter %s on every process", node.org,
            len(ranks), ", ".join(f"rank {r['rank']} (pid {r['pid']}, {r['device']}) images {r['images'][0]}-"
                                  f"{r['images'][1] - 1} of each batch of {cfg.batch_size}" for r in ranks),
            cfg.local_steps, ranks[0]["adapter"])
        return stats

    def _dead(self, wait: float = 0.0) -> str | None:
        deadline = time.monotonic() + wait
        while True:
            for rank, worker in enumerate(self.workers, 1):
                if worker.poll() is not None:
                    return f"training process rank {rank} (pid {worker.pid}) exited with status {worker.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _watch(self) -> None:
        while not self.closing and (dead := self._dead()) is None:
            time.sleep(WATCH_SECONDS)
        if self.closing:
            return
        self.failed = self.failed or dead
        log(ERROR, "%s: this trainer exits, the next message starts it again with all its processes", dead)
        time.sleep(GRACE_SECONDS)
        if not self.closing:
            log(ERROR, "still waiting on the processes %g s after %s: exiting now", GRACE_SECONDS, dead)
            os._exit(1)

    def close(self) -> None:
        """Workers exit at the end of their stdin; any still inside a collective is killed."""
        self.closing = True
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.stdin.close()
        deadline = time.monotonic() + CLOSE_SECONDS
        for worker in self.workers:
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


# --- A worker ------------------------------------------------------------------------------------

def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def worker(parent: int) -> int:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    from .model import NonFiniteLoss
    from .training import Resident

    accelerator = _accelerator()
    rank = accelerator.process_index
    log(INFO, "training process rank %d of %d: pid %d on %s", rank, accelerator.num_processes, os.getpid(),
        accelerator.device)
    resident = Resident()
    while line := sys.stdin.buffer.readline():  # empty at the end: rank 0 has exited
        job = json.loads(line)
        try:
            cfg = RunConfig.from_flower(job["run_config"])
            node = NodeConfig.from_flower(job["node_config"], job["run_config"])
            data, net = resident.data(cfg, node), resident.net(cfg)
            if resident.data_key[-1] != job["files"]:
                raise RuntimeError(f"the files in {node.data_dir} changed between rank 0's reading and this one's")
            net.train(data, cfg.local_steps, cfg.batch_size, cfg.learning_rate, job["seed"], accelerator=accelerator)
            _trained(accelerator, net, cfg)
        except NonFiniteLoss:
            continue  # so did every process at the same step; rank 0 reports it
        except Exception as err:  # noqa: BLE001 - the processes are out of step: leave, rank 0 names this one
            log(ERROR, "training process rank %d: %s: %s", rank, type(err).__name__, err, exc_info=True)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A training process of a warm trainer; the trainer starts it.")
    parser.add_argument("--parent", type=int, required=True, help="exit when this process does (rank 0)")
    return worker(parser.parse_args(argv).parent)


if __name__ == "__main__":
    sys.exit(main())
