"""A misbehaving organisation for the loopback federation, outside the shipped app.

Why this way: every node receives the same app bundle, so a misbehaviour cannot live in app/ (a node
setting read by a test-only hook would ship in the app). A SuperNode in Flower's default isolation
starts `flower-superexec`, which starts one `flwr-clientapp` process per message, both by bare name
from PATH. `write_wrapper` puts a test-owned `flwr-clientapp` first on one SuperNode's PATH: it runs
Flower's own entry point after patching `ClientApp.__call__` to rewrite that node's replies, the way
a member that edited its copy of the code could. The other nodes run the app untouched.

What it does is read from the file named by $MISBEHAVE_FILE on every message, so a test can switch it
between runs: "garbage-props", "wrong-fingerprint", "poison" (a plain fit update at the bound on every
coordinate), "add-levels <path.npy>" (int64 levels added to the masked SecAgg+ vector), or "" (honest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_wrapper(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "flwr-clientapp"
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
                       "import misbehaving_node\nmisbehaving_node.install()\n"
                       "from flwr.supernode.cli import flwr_clientapp\nsys.exit(flwr_clientapp())\n")
    wrapper.chmod(0o755)
    return wrapper


def _mode() -> list[str]:
    return Path(os.environ["MISBEHAVE_FILE"]).read_text().split()


def install() -> None:
    from flwr.client import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    original = ClientApp.__call__

    def misbehaving_call(self, message, context):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None  # secaggplus_mod pops it
        kind = message.metadata.message_type
        reply = original(self, message, context)
        if reply.has_error():
            return reply
        return _rewrite(_mode(), kind, stage, reply, context)

    ClientApp.__call__ = misbehaving_call


def _rewrite(mode, kind, stage, reply, context):
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    if not mode:
        return reply
    content = reply.content
    if mode[0] == "garbage-props" and "getpropertiesres.properties" in content.config_records:
        record = content.config_records["getpropertiesres.properties"]
        record.clear()
        record["org"] = 7
        record["num-train"] = "lots"
    elif mode[0] == "wrong-fingerprint":
        for records in (content.config_records, content.metric_records):
            if "fitres.metrics" in records and "received_fingerprint" in records["fitres.metrics"]:
                records["fitres.metrics"]["received_fingerprint"] = "0123456789abcdef"
    elif mode[0] == "poison" and kind == "train" and "fitres.parameters" in content.array_records:
        from flwr.app import Array

        bound = sys.modules["app.secagg"].adam_update_bound(
            float(context.run_config["learning-rate"]), int(context.run_config["local-steps"]))
        record = content.array_records["fitres.parameters"]
        for key in list(record):
            record[key] = Array(np.full(record[key].numpy().shape, bound * 0.999, np.float32))
    elif mode[0] == "add-levels" and stage == "collect_masked_vectors":
        out = content.config_records[RECORD_KEY_CONFIGS]
        arrays = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
        arrays[1] = (arrays[1] + np.load(mode[1])) % 2**32
        out[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
    return reply
