"""docs/architecture.md names every module of the package, and names no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mlsteps"


def _tree_block() -> str:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    match = re.search(r"```\nmlsteps/\n(.*?)```", text, re.S)
    assert match, "docs/architecture.md has lost its module tree"
    return match.group(1)


def _documented() -> set[str]:
    """Module paths in the tree: each `name.py` token, under the folder its indentation says."""
    found, folders = set(), {0: ""}
    for line in _tree_block().splitlines():
        indent = len(line) - len(line.lstrip(" "))
        words = line.split()
        if not words:
            continue
        if words[0].endswith("/"):
            parent = folders.get(indent - 2, "")
            folders[indent] = f"{parent}{words[0]}"
            continue
        prefix = folders.get(indent - 2, "")
        # a line may list several modules ("tokenizer.py pretrain.py ..."); a description may
        # mention other files (e.g. design.md), so stop at the first word that is no module
        for word in words:
            if not word.endswith(".py"):
                break
            found.add(prefix + word)
    return found


def _actual() -> set[str]:
    return {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts
    }


def test_every_module_is_in_the_architecture_doc() -> None:
    missing = sorted(_actual() - _documented())
    assert not missing, f"add these modules to docs/architecture.md with their purpose: {missing}"


def test_the_architecture_doc_names_no_missing_module() -> None:
    stale = sorted(_documented() - _actual())
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
