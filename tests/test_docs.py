"""The project's words checked where that is cheap: every configuration key shipped in
``config.example.yaml`` is one the parser knows and one docs/configuration.md documents, every key the parser
knows is in the example, and every relative link in the README, CONTRIBUTING.md and docs/ points at a file
(and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.config import OPERATION_KEYS, TOP_LEVEL_KEYS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
CONFIG_DOC = REPO / "docs" / "configuration.md"
MARKDOWN = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]

# A key at the start of a line, set or shown commented out: "refresh_interval: 5m", "# state_file: ...".
_TOP_KEY = re.compile(r"^(?:# )?([a-z_]+):", re.M)
# An operation's key, indented under `operations:`, possibly as the list item's first key.
_OPERATION_KEY = re.compile(r"^ {2,4}(?:- |# )?([a-z_]+):", re.M)


def _example_keys() -> tuple[set[str], set[str]]:
    text = EXAMPLE.read_text(encoding="utf-8")
    head, _, operations = text.partition("\noperations:\n")
    top = set(_TOP_KEY.findall(head)) | {"operations"}
    return top, set(_OPERATION_KEY.findall(operations))


def test_every_key_of_the_example_is_known_and_every_known_key_is_shown() -> None:
    top, operation = _example_keys()
    assert top == set(TOP_LEVEL_KEYS), f"example vs parser, top level: {top ^ set(TOP_LEVEL_KEYS)}"
    assert operation == set(OPERATION_KEYS), (
        f"example vs parser, operations[]: {operation ^ set(OPERATION_KEYS)}"
    )


def test_every_key_is_documented() -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    undocumented = sorted(key for key in TOP_LEVEL_KEYS if f"`{key}`" not in text)
    undocumented += sorted(
        f"operations[].{key}" for key in OPERATION_KEYS if f"`operations[].{key}`" not in text
    )
    assert not undocumented, f"keys the parser knows but docs/configuration.md does not name: {undocumented}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        path_part, _, fragment = target.partition("#")
        file = (document.parent / path_part).resolve() if path_part else document
        if not file.exists():
            broken.append(target)
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(target)
    assert not broken, f"{document.name}: links to nothing: {broken}"
