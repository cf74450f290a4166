"""Does what the coordinator keeps (a round's record, metrics.jsonl, its log) reveal an organisation's
own figures? Numbers are compared as numbers, wherever they sit, not as formatted strings.

`figures`: organisation -> {name: value}, each organisation's own figures (losses, image counts) as
the test knows them. A float figure is found by value anywhere (to the precision it is shown with);
an integer figure (an image count of 7) cannot be told apart from a round number by value, so it
counts only where it is tied to an organisation: under a key naming it, or on a log line naming it.
"""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower's coloured log levels
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
# On a line naming an organisation, the numbers a private run may show: the round, and how long the
# coordinator waited for the node (which it measures itself, whatever the node reports).
ALLOWED_ON_AN_ORG_LINE = [re.compile(p) for p in (r"\[ROUND \d+/\d+\]", r"answered in \d+(?:\.\d+)? s")]


def _walk(obj, path=(), in_text=False):
    """(path, value, in_text) for every number in obj: dict values, list items, and numbers written
    in strings (in_text: those can also be pieces of a hash or a name, e.g. a fingerprint "3f0a...")."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj, in_text
    elif isinstance(obj, str):
        for m in NUMBER.finditer(obj):
            yield path, float(m.group()) if re.search(r"[.eE]", m.group()) else int(m.group()), True
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, path)


def _same(shown: float | int, figure: float, text: str | None = None) -> bool:
    """`shown` is `figure`: within 1e-6 relative, or, as written in `text`, within one unit of its last
    digit (a figure recomputed outside the run can differ from the node's own in the 7th digit). Text
    only from three significant digits on: a "1.2 s" is as likely a timing as a loss (on a line naming
    an organisation, log_leaks flags any number)."""
    if text is not None and "." in text and "e" not in text.lower():
        return len(text.replace("-", "").replace(".", "").lstrip("0")) >= 3 \
            and abs(figure - float(text)) <= 10.0 ** -len(text.split(".")[1])
    return abs(shown - figure) <= 1e-6 * max(abs(figure), 1e-12)


def record_leaks(record, figures: dict[str, dict[str, float]]) -> list[str]:
    """Where `record` (a dict of dicts, lists, strings and numbers) holds an organisation's figure."""
    found = []
    for path, value, in_text in _walk(record):
        for org, own in figures.items():
            if org in path and not in_text:
                found.append(f"{'.'.join(path)} = {value}: a number filed under {org}")
            for name, figure in own.items():
                if isinstance(figure, float) and not figure.is_integer() and _same(value, figure):
                    found.append(f"{'.'.join(path)} = {value}: {org}'s {name}")
    return found


def log_leaks(log: str, figures: dict[str, dict[str, float]]) -> list[str]:
    """Lines of `log` that tie a number to an organisation, or show an organisation's float figure."""
    found = []
    name = "|".join(re.escape(org) for org in sorted(figures, key=len, reverse=True))
    # Two or more organisations in a list is participation ("over org-1, org-2", "(org-1, org-2)"),
    # which the coordinator knows in any mode; one organisation alone beside a figure is not.
    participation = re.compile(rf"(?<![\w-])(?:{name})(?:,\s*(?:{name}))+(?![\w-])") if figures else None
    for line in ANSI.sub("", log).splitlines():
        rest = participation.sub(" ", line) if participation else line
        named = [org for org in figures if re.search(rf"(?<![\w-]){re.escape(org)}(?![\w-])", rest)]
        for org in named:
            rest = rest.replace(org, " ")
        for allowed in ALLOWED_ON_AN_ORG_LINE:
            rest = allowed.sub(" ", rest)
        numbers = NUMBER.findall(rest)
        if named and numbers:
            found.append(f"{line.strip()!r}: {', '.join(numbers)} next to {', '.join(named)}")
            continue
        for text in numbers:
            for org, own in figures.items():
                for name, figure in own.items():
                    if isinstance(figure, float) and not figure.is_integer() and _same(float(text), figure, text):
                        found.append(f"{line.strip()!r}: {text} is {org}'s {name}")
    return found
