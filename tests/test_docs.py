"""The documentation names only what exists: every test and file it cites, every `make` target, every
`.env` variable and every run or node setting. A rename in the code without the docs fails here.

Each check is a function of texts, so that the negative tests below can show it catching a renamed
target, variable or setting.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "SECURITY.md", REPO / "certs" / "README.md", REPO / "docker" / "join" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
# Written on other branches at the same time as docs/security.md, which links them; the lead merges
# them. Once they are in, this set must go (test_pending_docs_are_not_yet_here says when).
# Names in the docs that are not this project's to define: Flower's, Docker's, Hugging Face's, ...
FOREIGN_SETTINGS = {"num-supernodes", "client-resources-num-cpus", "client-resources-num-gpus"}


def docs() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in DOCS}


def code_spans(text: str) -> list[str]:
    """What the docs present as literal: fenced blocks and `inline code` (which may wrap a line)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return fenced + re.findall(r"`([^`]+)`", rest)


# --- make targets ------------------------------------------------------------------------------

def make_targets(makefile: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z][\w-]*)\s*:(?!=)", makefile, re.M))


def named_targets(text: str) -> set[str]:
    """`make a b VAR=x` names targets a and b; so does a console line `$ make a`."""
    names = set()
    for span in code_spans(text):
        for match in re.finditer(r"(?:^|[\s$;&|(])make((?:[ \t]+[a-z][a-z0-9-]*)+)", span, re.M):
            names.update(match.group(1).split())
    return names


def missing_targets(doc_texts: dict[str, str], makefile: str) -> dict[str, set[str]]:
    targets = make_targets(makefile)
    return {name: missing for name, text in doc_texts.items() if (missing := named_targets(text) - targets)}


# --- .env variables ----------------------------------------------------------------------------

def env_names(text: str) -> set[str]:
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))


def table_first_column(text: str, heading: str) -> set[str]:
    """Every `NAME` in the first column of the table under `heading`."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row)}


def env_table_mismatch(configuration: str, env_file: str, heading: str, *more_env_files: str) -> tuple[set, set]:
    """(documented but not in the file, in the file but undocumented); ranges like ORG1_GPU .. ORG3_GPU
    are spelled out in the table's first cell as their ends."""
    documented = {n for n in table_first_column(configuration, heading) if re.fullmatch(r"[A-Z][A-Z0-9_]*", n)}
    defined = env_names(env_file).union(*(env_names(f) for f in more_env_files))
    ranges = {f"ORG{i}_GPU" for i in range(1, 4)} if {"ORG1_GPU", "ORG3_GPU"} <= documented else set()
    return documented - defined, defined - documented - ranges


def code_text() -> str:
    """Everything but the docs: where a variable a doc names must be defined or read."""
    files = [REPO / "Makefile", REPO / ".env", REPO / "pyproject.toml", REPO / ".ci" / "run",
             *REPO.glob("compose*.yaml"), *(REPO / "docker").rglob("*"), *(REPO / "app").glob("*.py"),
             *(REPO / "certs").glob("*.py"), *(REPO / "tests").glob("*.py")]
    return "\n".join(f.read_text(errors="replace") for f in files
                     if f.is_file() and f.suffix != ".md" and f.name not in ("grafana.env", "org.env"))


def unknown_variables(doc_texts: dict[str, str], code: str) -> dict[str, set[str]]:
    """VARIABLES the docs set or name (`NAME=...`, `$NAME`, `NAME` alone) that no code file mentions."""
    found = {}
    for name, text in doc_texts.items():
        names = set()
        for span in code_spans(text):
            names.update(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+)\b", span))
            names.update(re.findall(r"(?<![\w$])([A-Z][A-Z0-9_]*)=", span))  # make up GPU=1, ORG=clinic-a
        unknown = {n for n in names if not re.search(rf"\b{n}\b", code)}
        if unknown:
            found[name] = unknown
    return found


# --- run and node settings ---------------------------------------------------------------------

def run_settings(pyproject: str) -> set[str]:
    return set(tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"])


def node_settings() -> set[str]:
    """The node settings: NodeConfig's fields, each read from --node-config under its kebab-case name."""
    import inspect

    from app.config import NodeConfig

    names = {f.name.replace("_", "-") for f in dataclasses.fields(NodeConfig)}
    source = inspect.getsource(NodeConfig.from_flower)
    assert all(f'"{n}"' in source for n in names), "a NodeConfig field is not read under its kebab-case name"
    return names


def named_settings(text: str) -> set[str]:
    """kebab-case names given a value in the docs' literals: `org-metrics="private"`, 'num-server-rounds=20'."""
    names = set()
    for span in code_spans(text):
        names.update(re.findall(r"(?<![\w-])([a-z][a-z0-9]*(?:-[a-z0-9]+)+)=", span))
    return names


def unknown_settings(doc_texts: dict[str, str], settings: set[str]) -> dict[str, set[str]]:
    return {name: unknown for name, text in doc_texts.items()
            if (unknown := named_settings(text) - settings - FOREIGN_SETTINGS)}


# --- the checks --------------------------------------------------------------------------------

def test_every_test_the_docs_cite_exists():
    defined = {m for f in (REPO / "tests").glob("*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = {f"tests/{f.name}" for f in (REPO / "tests").glob("*.py")}
    text = "\n".join(docs().values())
    cited = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", text))
    cited_files = set(re.findall(r"`(tests/\w+\.py)", text))
    assert cited, "the docs cite no test"
    assert cited <= defined, f"the docs cite tests that do not exist: {sorted(cited - defined)}"
    assert cited_files <= files, f"the docs cite test files that do not exist: {sorted(cited_files - files)}"


def test_every_file_the_docs_link_or_cite_exists():
    missing = {}
    for name, text in docs().items():
        base = (REPO / name).parent
        links = {m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"\w+://", m)}
        for link in links:
            target = (base / link).resolve()
            if not target.exists():
                missing.setdefault(name, set()).add(link)
        # Repository paths in code spans: app/x.py, docker/..., certs/..., tests/...
        for path in re.findall(r"`((?:app|docker|certs|tests|docs)/[\w./-]+\.(?:py|sh|yaml|yml|json|md|conf))`", text):
            if not (REPO / path).exists():
                missing.setdefault(name, set()).add(path)
    assert not missing, f"the docs point at files that do not exist: {missing}"


def test_the_docs_cite_nothing_outside_the_repository():
    for name, text in docs().items():
        assert "../shared" not in text and "/work/" not in text, name


def test_every_make_target_the_docs_name_exists():
    assert named_targets(docs()["README.md"]) >= {"demo", "up-gpu", "up", "certs", "join", "run"}
    assert not (missing := missing_targets(docs(), (REPO / "Makefile").read_text())), \
        f"the docs name make targets that do not exist: {missing}"


def test_every_env_variable_is_documented_and_every_documented_one_exists():
    configuration = (REPO / "docs" / "configuration.md").read_text()
    extra, undocumented = env_table_mismatch(configuration, (REPO / ".env").read_text(), "## Deployment (`.env`)")
    assert not extra, f"docs/configuration.md documents .env variables that .env lacks: {sorted(extra)}"
    assert not undocumented, f".env variables missing from docs/configuration.md: {sorted(undocumented)}"
    join = [(REPO / "docker" / "join" / f).read_text() for f in (".env", "org.env.example")]
    extra, undocumented = env_table_mismatch(configuration, join[0], "## An organisation's node", join[1])
    assert not extra and not undocumented, (extra, undocumented)


def test_every_variable_the_docs_name_exists_in_the_code():
    assert not (unknown := unknown_variables(docs(), code_text())), f"the docs name unknown variables: {unknown}"


def test_every_run_and_node_setting_is_documented_and_every_documented_one_exists():
    configuration = (REPO / "docs" / "configuration.md").read_text()
    run = run_settings((REPO / "pyproject.toml").read_text())
    node = node_settings()
    run_table = {n for n in table_first_column(configuration, "## Run settings") if "-" in n or n.isalpha()}
    node_table = table_first_column(configuration, "## Node settings")
    assert run_table == run, (sorted(run_table - run), sorted(run - run_table))
    readme_table = table_first_column((REPO / "README.md").read_text(), "## Run settings people change")
    assert readme_table and readme_table <= run, sorted(readme_table - run)
    assert node_table == node, (sorted(node_table - node), sorted(node - node_table))
    assert not (unknown := unknown_settings(docs(), run | node)), f"the docs set unknown settings: {unknown}"


# --- the checks catch a rename -----------------------------------------------------------------

def test_a_renamed_make_target_is_caught():
    makefile = (REPO / "Makefile").read_text()
    assert not missing_targets(docs(), makefile)
    renamed = makefile.replace("\njoin-check-gpu:", "\njoin-gpu-check:")
    assert renamed != makefile
    missing = missing_targets(docs(), renamed)
    assert {"join-check-gpu"} == set().union(*missing.values()) and "README.md" in missing


def test_a_renamed_env_variable_is_caught():
    configuration = (REPO / "docs" / "configuration.md").read_text()
    env = (REPO / ".env").read_text()
    renamed = env.replace("\nALERT_WEBHOOK_URL=", "\nALERTS_WEBHOOK=")
    assert env_table_mismatch(configuration, env, "## Deployment (`.env`)") == (set(), set())
    assert env_table_mismatch(configuration, renamed, "## Deployment (`.env`)") == ({"ALERT_WEBHOOK_URL"}, {"ALERTS_WEBHOOK"})
    code = code_text()
    assert "README.md" in unknown_variables(docs(), re.sub(r"\bALERT_WEBHOOK_URL\b", "ALERTS_WEBHOOK", code))


@pytest.mark.parametrize("setting", ["org-metrics", "share-metrics"])
def test_a_renamed_setting_is_caught(setting):
    settings = run_settings((REPO / "pyproject.toml").read_text()) | node_settings()
    assert not unknown_settings(docs(), settings)
    assert setting in set().union(*unknown_settings(docs(), settings - {setting}).values())
