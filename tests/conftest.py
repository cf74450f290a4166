"""Session-wide offline fixtures: the tiny model, per-organisation demo data, TLS certificates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from app.offline import write_demo_data, write_tiny_model  # noqa: E402
from federation import load_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORGS = ("org-1", "org-2", "org-3")
# Unequal, so that the federation tests prove the aggregate is example-weighted, not a plain mean.
DEMO_IMAGES = (10, 16, 24)


def load_certs_tool():
    return load_module("certs_tool", REPO / "certs" / "certs.py")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """`make pretrain`'s recipe, short (tests/test_pretrain.py states what it must reach)."""
    from app.pretrain import pretrain
    from test_pretrain import SHORT_UNET_STEPS, SHORT_VAE_STEPS

    import torch

    # One thread: the session's federation nodes run one each too, and two OpenMP threads on a
    # shared 2-core machine wait on each other at every step (beside another benchmark the recipe's
    # VAE steps took 3.4 s each on two threads, 0.12 s on a quiet machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("digits-sd") / "model"
    try:
        pretrain(out, vae_steps=SHORT_VAE_STEPS, unet_steps=SHORT_UNET_STEPS)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_demo_data(root, orgs=len(ORGS), images_per_org=list(DEMO_IMAGES))
    return root


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    load_certs_tool().generate(d, [])
    return d


def with_defaults(run_config: dict) -> dict:
    """The run config a ServerApp or ClientApp sees: pyproject's defaults under the overrides."""
    import tomllib

    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return defaults | run_config


def tiny_run_config(tiny_model: Path, output_dir: Path, **overrides) -> dict:
    """Run settings for the tiny model: small, fast, and still learning something measurable."""
    return {
        "base-model": str(tiny_model), "resolution": 32, "num-server-rounds": 2, "local-steps": 8,
        "batch-size": 4, "learning-rate": 1e-3, "heldout-fraction": 0.25, "eval-timesteps": 8,
        "output-dir": str(output_dir), "sample-steps": 2, "node-wait-timeout": 120, "round-timeout": 300,
        **overrides,
    }


@pytest.fixture(scope="session")
def stack():
    """The one Compose stack that the Docker test modules share (`make certs up`, tests/stack.py),
    started once per session: the stack tests, isolation, gateway, alerts. A module that breaks the
    stack on purpose (tests/test_faults.py) brings up its own. The joining organisation's
    containers reach the gateway through this host, as from afar."""
    from stack import JOIN_HOST, compose_stack

    # Compose project names: FEDLORA_TEST_PROJECT_PREFIX keeps several checkouts' stacks apart on one engine.
    prefix = os.environ.get("FEDLORA_TEST_PROJECT_PREFIX", "fedlora")
    with compose_stack(f"{prefix}-e2e", SUPERLINK_BIND="0.0.0.0", SANS=JOIN_HOST) as s:
        yield s


def pytest_collection_modifyitems(items):
    """The tests on the shared Compose stack run last and together, so that the stack (started at its
    first use, removed at the session's end) neither idles through the rest of the suite, taking CPU
    from the loopback federations, nor runs beside tests/test_faults.py's own stack. The user's own
    run (tests/test_stack.py) goes first, on a stack nothing has poked yet; the certificate rotation
    last: it restarts the SuperLink and the gateway under everyone's feet."""
    order = {"test_stack": 0, "test_rotation": 2}

    def group(item) -> tuple[bool, int]:
        shared = "stack" in getattr(item, "fixturenames", ())
        return shared, order.get(item.module.__name__, 1) if shared else 0

    items.sort(key=group)
