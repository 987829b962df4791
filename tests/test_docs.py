"""The project's words checked where that is cheap: every configuration key shipped in
``config.example.yaml`` is one the parser knows and one docs/configuration.md documents, every key the parser
knows is in the example, every relative link in the README, CONTRIBUTING.md and docs/ points at a file
(and heading) that exists, docs/DESIGN.md's module table names every module with the modules it imports,
docs/metrics.md names every metric family, and docs/fetching.md every failure reason (in order) and
every billing api."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from exporter.config import OPERATION_KEYS, TOP_LEVEL_KEYS
from exporter.families import GLOBAL_FAMILIES, OPERATION_FAMILIES
from exporter.model import BILLING_APIS, REASONS

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
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to hyphens
    (``token_limit`` keeps its underscore)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
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


def test_designs_module_table_names_every_module_and_nothing_else() -> None:
    """docs/DESIGN.md's "Modules, one job each" table against the package as it is."""
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    table = text.split("## Modules, one job each", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([\w/]+(?:\.py)?)` \|", table, flags=re.M))
    package = REPO / "exporter"
    actual = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert named == actual, f"DESIGN.md's module table vs exporter/: {sorted(named ^ actual)}"


def _imports_of_ours(files: list[Path], own: str) -> set[str]:
    """The exporter modules ``files`` import (``from exporter.x import``, ``from exporter import x``),
    leaving out ``own`` (a package's imports of itself) and the version string."""
    found: set[str] = set()
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exporter"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found |= {alias.name for alias in node.names if alias.name != "__version__"}
    return found - {own}


def test_designs_import_column_is_what_each_module_imports() -> None:
    """The table's "imports of ours" column: the modules named (before any parenthesis) are exactly those
    the module imports, so a new dependency between modules shows in the design notes."""
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    table = text.split("## Modules, one job each", 1)[1].split("\n## ", 1)[0]
    package = REPO / "exporter"
    wrong = []
    for name, column in re.findall(r"^\| `([\w/]+(?:\.py)?)` \| .* \| ([^|]+) \|$", table, flags=re.M):
        if column.strip().startswith("all of the above"):
            continue  # app.py: the composition root
        listed = set()
        if column.strip() != "none":
            listed = {item.split()[0] for item in re.sub(r"\([^)]*\)", "", column).split(",") if item.strip()}
        if name.endswith("/"):
            files, own = sorted((package / name).glob("*.py")), name.rstrip("/")
        else:
            files, own = [package / name], name.removesuffix(".py")
        actual = _imports_of_ours(files, own)
        if listed != actual:
            wrong.append(f"{name}: listed {sorted(listed)}, imports {sorted(actual)}")
    assert not wrong, "DESIGN.md's imports column vs the code:\n" + "\n".join(wrong)


def _table_after(text: str, heading: str) -> list[str]:
    """The rows of the first table after ``heading``, its header and separator left out."""
    rows: list[str] = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]


def test_metrics_md_names_every_metric_family_and_nothing_else() -> None:
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    first_column = [row.split("|")[1] for row in _table_after(text, "# Metrics")]
    named = {name for cell in first_column for name in re.findall(r"`(wolkvox_\w+)`", cell)}
    families = {entry.family.name for entry in OPERATION_FAMILIES} | {f.name for f, _ in GLOBAL_FAMILIES}
    assert named == families, f"docs/metrics.md vs exporter/families.py: {sorted(named ^ families)}"


def test_fetching_md_lists_the_failure_reasons_in_order_and_every_billing_api() -> None:
    text = (REPO / "docs" / "fetching.md").read_text(encoding="utf-8")
    reasons = [
        re.findall(r"`(\w+)`", row.split("|")[1])[0] for row in _table_after(text, "## Failure reasons")
    ]
    assert tuple(reasons) == REASONS, "docs/fetching.md's failure reasons vs model.REASONS"
    services = _table_after(text, "## Billing services")
    apis = {name for row in services for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert apis == set(BILLING_APIS), (
        f"docs/fetching.md's billing services vs model.BILLING_APIS: {apis ^ set(BILLING_APIS)}"
    )


def test_no_retired_key_is_named_outside_the_changelog_and_the_parser() -> None:
    """A retired key lives on only in the CHANGELOG and in the parser's message about it, so nothing a
    user reads (docs, examples, alert and dashboard texts, deploy files) tells them to set one."""
    from exporter.config import RETIRED_KEYS

    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    allowed = {"CHANGELOG.md", "exporter/config.py"}
    found = []
    for name in tracked:
        if name in allowed or name.startswith("tests/") or not (REPO / name).is_file():
            continue
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {key}" for key in RETIRED_KEYS if key in text]
    assert not found, f"retired keys named outside the CHANGELOG and the parser: {found}"
