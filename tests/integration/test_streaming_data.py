"""Streamed pretraining corpora (`streaming: true`) and the resident set of a corpus pass
(issue 19): a streamed source packs into the same blocks as the prepared one, resumes exactly
after kill -9, and no pass over the text keeps the pages it has read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlsteps.engine import data as data_module
from mlsteps.engine import filepages
from mlsteps.engine.data import TEXT_COLUMN, load_text
from mlsteps.specs.common import DataSpec

WIKI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"


def _arrow_rss_kb(root: Path) -> int:
    """Resident KiB of this process's mappings of Arrow files under ``root``."""
    total, inside = 0, False
    root_s = os.path.realpath(root)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            path = os.path.realpath(head[-1]) if len(head) >= 6 else ""
            inside = path.startswith(root_s) and path.endswith(".arrow")
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_loading_a_txt_corpus_does_not_keep_its_pages_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The txt loader's row pass (datasets.map over the memory-mapped Arrow file) read the
    whole corpus into RSS: +330 MB of file pages at 400 MB of text in bench/scale_data.py."""
    if not WIKI.exists():
        pytest.skip("shared data not found")
    src = tmp_path / "t.txt"
    src.write_text(WIKI.read_text(encoding="utf-8") * 3, "utf-8")  # ~3.3 MB
    monkeypatch.setattr(filepages, "RELEASE_BYTES", 256 << 10)
    resident: list[int] = []
    real = data_module._txt_rows

    def spy(texts: list[str], unit: str) -> list[str]:
        resident.append(_arrow_rss_kb(tmp_path / "hf"))
        return real(texts, unit)

    monkeypatch.setattr(data_module, "_txt_rows", spy)
    ds = load_text(
        [DataSpec(files=[str(src)])],
        ["text"],
        where="w",
        column_where="w",
        cache_dir=tmp_path / "hf",
    )
    assert len(resident) > 10
    # At most the bytes since the last release, one batch (1,000 lines) and read-ahead.
    assert max(resident) < 1200, resident
    lines = [t.strip("\n") for t in src.read_text("utf-8").splitlines() if t.strip()]
    assert ds[TEXT_COLUMN] == [t.lstrip("\ufeff") for t in lines]
