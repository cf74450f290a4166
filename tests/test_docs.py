"""The README's claims point at tests: every test it names must exist, or the claim has lost its proof."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_readme_cites_exists():
    readme = (REPO / "README.md").read_text()
    defined = {m for f in (REPO / "tests").glob("*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = {f"tests/{f.name}" for f in (REPO / "tests").glob("*.py")}
    cited = set(re.findall(r"`(test_\w+)`", readme))
    cited_files = set(re.findall(r"`(tests/\w+\.py)`", readme))
    assert cited, "the README cites no test"
    assert cited <= defined, f"README cites tests that do not exist: {sorted(cited - defined)}"
    assert cited_files <= files, f"README cites test files that do not exist: {sorted(cited_files - files)}"
