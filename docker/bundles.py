"""An organisation's app-bundle approvals: review a bundle, approve it, revoke it (docs/approval.md).

    bundles.py --approval-dir DIR review  FAB     the SHA-256, the files, the diff against the last approved
    bundles.py --approval-dir DIR approve FAB [--note TEXT]
    bundles.py --approval-dir DIR revoke  SHA256
    bundles.py --approval-dir DIR list
    bundles.py build APP_DIR OUT.fab              the bundle `flwr run APP_DIR` submits (needs flwr)

FAB is a .fab file, the SHA-256 of one kept in DIR (approved, or refused by the node and copied to
DIR/refused/ by `make review-bundle`), or an app directory, bundled as `flwr run` does. DIR holds
approved-bundles.txt, the list the node reads (mounted read-only; docker/bundle_guard.py), and a copy
of every approved bundle in bundles/, which later reviews diff against. Only the standard library,
except `build`.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

LIST = "approved-bundles.txt"
SHA256 = re.compile(r"[0-9a-f]{64}")
HEADER = """\
# App bundles this organisation approved to run on its node, by SHA-256 (docs/approval.md).
# Written by `make approve-bundle` / `make revoke-bundle`; the node reads it at every message.
"""


class Fail(SystemExit):
    pass


def build(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk  # what `flwr run` ships (flwr/cli/run/run.py)

    return build_fab_from_disk(app_dir)


def load(fab: str, approval: Path) -> tuple[bytes, str]:
    """The bundle's bytes and where they came from."""
    path = Path(fab)
    if SHA256.fullmatch(fab):
        for where in (approval / "bundles", approval / "refused"):
            if (where / f"{fab}.fab").is_file():
                path = where / f"{fab}.fab"
                break
        else:
            raise Fail(f"no bundle {fab} in {approval}/bundles or {approval}/refused. If the node refused it, "
                       "`make review-bundle FAB=<sha256>` copies it from the node's cache; or give the .fab file")
    if path.is_dir():
        return build(path), f"built from {path}"
    if not path.is_file():
        raise Fail(f"{fab}: no such .fab file, app directory or SHA-256")
    content = path.read_bytes()
    if path.parent.name in ("bundles", "refused") and path.stem != hashlib.sha256(content).hexdigest():
        raise Fail(f"{path} does not hash to its name: it was changed after it was kept. Do not approve it")
    return content, str(path)


def files(content: bytes) -> dict[str, bytes]:
    """The bundle's files, checked against its manifest as Flower's installer checks them."""
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        out = {name: z.read(name) for name in z.namelist() if not name.endswith("/")}
    manifest = out.pop(".info/CONTENT", b"").decode()
    listed = {}
    for line in manifest.strip().splitlines():
        name, digest, _ = line.rsplit(",", 2)
        listed[name] = digest
    for name, data in out.items():
        if listed.get(name) != hashlib.sha256(data).hexdigest():
            raise Fail(f"{name} in the bundle does not match its manifest (.info/CONTENT): Flower refuses to install "
                       "it; so should you")
    return out


def read_list(approval: Path) -> list[str]:
    path = approval / LIST
    return path.read_text().splitlines() if path.exists() else []


def approved(approval: Path) -> list[str]:
    """Approved hashes, oldest first."""
    out = []
    for line in read_list(approval):
        field = line.split("#", 1)[0].split()
        if field and SHA256.fullmatch(field[0]):
            out.append(field[0])
    return out


def _text(data: bytes) -> list[str] | None:
    try:
        return data.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def review(content: bytes, source: str, approval: Path, out=None) -> None:
    out = out or sys.stdout
    sha = hashlib.sha256(content).hexdigest()
    current = files(content)
    hashes = approved(approval)
    print(f"bundle   {source}\nsha256   {sha}\nstatus   {'APPROVED' if sha in hashes else 'not approved'} "
          f"(in {approval / LIST})\n\nfiles ({len(current)}):", file=out)
    for name, data in sorted(current.items()):
        print(f"  {hashlib.sha256(data).hexdigest()[:16]}  {len(data):>8}  {name}", file=out)
    previous = next((h for h in reversed(hashes) if h != sha and (approval / "bundles" / f"{h}.fab").is_file()), None)
    if previous is None:
        print("\nNo earlier approved bundle to compare with: review every file above.", file=out)
        return
    before = files((approval / "bundles" / f"{previous}.fab").read_bytes())
    print(f"\nchanges since the last approved bundle, sha256 {previous}:", file=out)
    changed = False
    for name in sorted(before.keys() | current.keys()):
        old, new = before.get(name), current.get(name)
        if old == new:
            continue
        changed = True
        a, b = _text(old or b""), _text(new or b"")
        if a is None or b is None:
            print(f"binary file {name} {'added' if old is None else 'removed' if new is None else 'changed'}", file=out)
            continue
        out.writelines(difflib.unified_diff(a, b, f"a/{name}" if old is not None else "/dev/null",
                                            f"b/{name}" if new is not None else "/dev/null"))
    if not changed:
        print("  (no file differs)", file=out)


def approve(content: bytes, source: str, approval: Path, note: str) -> str:
    sha = hashlib.sha256(content).hexdigest()
    files(content)  # never approve what Flower's installer would refuse
    (approval / "bundles").mkdir(parents=True, exist_ok=True)
    kept = approval / "bundles" / f"{sha}.fab"
    if not kept.exists():
        kept.write_bytes(content)
    if sha in approved(approval):
        print(f"already approved: {sha}")
        return sha
    lines = read_list(approval) or HEADER.splitlines()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines.append(f"{sha}  {stamp}  {note or source}".rstrip())
    _write(approval, lines)
    print(f"approved {sha}: this organisation's node runs it from its next message")
    return sha


def revoke(sha: str, approval: Path) -> None:
    if sha not in approved(approval):
        raise Fail(f"{sha} is not in {approval / LIST}; `make approved-bundles` lists what is")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [line for line in read_list(approval) if line.split("#", 1)[0].split()[:1] != [sha]]
    _write(approval, [*lines, f"# revoked {stamp}: {sha}"])
    print(f"revoked {sha}: this organisation's node refuses it from its next message. A process it already started "
          "(a warm trainer) ends with the node: restart the node (`make join-down join`) to end it now")


def _write(approval: Path, lines: list[str]) -> None:
    approval.mkdir(parents=True, exist_ok=True)
    tmp = approval / f".{LIST}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o644)  # the node's unprivileged user reads it
    tmp.replace(approval / LIST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--approval-dir", type=Path, default=Path("docker/join/approval"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("review").add_argument("fab")
    p = sub.add_parser("approve")
    p.add_argument("fab")
    p.add_argument("--note", default="")
    sub.add_parser("revoke").add_argument("sha256")
    sub.add_parser("list")
    p = sub.add_parser("build")
    p.add_argument("app_dir", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    approval = args.approval_dir
    if args.command == "review":
        review(*load(args.fab, approval), approval)
    elif args.command == "approve":
        approve(*load(args.fab, approval), approval, args.note)
    elif args.command == "revoke":
        revoke(args.sha256.lower(), approval)
    elif args.command == "list":
        print("\n".join(read_list(approval)) or f"nothing approved yet ({approval / LIST})")
    elif args.command == "build":
        content = build(args.app_dir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(content)
        print(f"{args.out}\nsha256 {hashlib.sha256(content).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
