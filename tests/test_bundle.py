"""What `flwr run .` ships to the SuperLink and every SuperNode: the app's code, nothing else."""

from __future__ import annotations

import io
import zipfile

from test_approval import app_tree


def test_bundle_holds_only_app_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    # The tracked tree plus what a working deployment has lying around: keys, data, outputs.
    tree = app_tree(tmp_path / "app-dir")
    for decoy in ["certs/ca.key", "certs/server.key", "certs/ca.pem", "data/org-1/metadata.jsonl",
                  "outputs/final/pytorch_lora_weights.safetensors", "outputs/metrics.json", "docker/notes.md",
                  "config.yaml", "tests/helper.py"]:
        (tree / decoy).parent.mkdir(parents=True, exist_ok=True)
        (tree / decoy).write_text("secret")
    fab = build_fab_from_disk(tree)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "pyproject.toml" in names and "app/server_app.py" in names and "app/client_app.py" in names
    unexpected = [n for n in names if not (n.startswith("app/") and n.endswith(".py"))
                  and n not in ("pyproject.toml", ".info/CONTENT")]
    assert unexpected == []
