"""Streamed pretraining corpora (`streaming: true`) and the resident set of a corpus pass
(issue 19): a streamed source packs into the same blocks as the prepared one, resumes exactly
after kill -9, and no pass over the text keeps the pages it has read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from mlsteps import cache
from mlsteps.context import StageContext
from mlsteps.engine import data_files as data_module
from mlsteps.engine import filepages
from mlsteps.engine.data import TEXT_COLUMN, load_text
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer as tokenizer_stage
from mlsteps.stages.pretrain import packing
from mlsteps.stages.pretrain.streaming import load_streamed_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_scale_data as scale  # noqa: E402  (its recipe, run and kill helpers)

relkit = scale.relkit
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
        data_field="w",
        column_field="w",
        cache_dir=tmp_path / "hf",
    )
    assert len(resident) > 10
    # At most the bytes since the last release, one batch (1,000 lines) and read-ahead.
    assert max(resident) < 1200, resident
    lines = [t.strip("\n") for t in src.read_text("utf-8").splitlines() if t.strip()]
    assert ds[TEXT_COLUMN] == [t.lstrip("\ufeff") for t in lines]


@pytest.fixture(scope="module")
def clm_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not WIKI.exists():
        pytest.skip("shared data not found")
    root = tmp_path_factory.mktemp("tok")
    ctx = StageContext(run_dir=root, stage="tok", kind="tokenizer", seed=0, quiet=True)
    spec = TokenizerSpec.model_validate(
        {
            "kind": "tokenizer",
            "data": {"files": [str(WIKI)], "max_samples": 300},
            "vocab_size": 300,
            "target": "clm",
        }
    )
    tokenizer_stage.run(spec, ctx)
    return AutoTokenizer.from_pretrained(ctx.final_dir)


def _pack(text: Any, tok: Any, fingerprint: str | None = None) -> packing.PackedBlocks:
    return packing.pack_corpus(
        text, tok, TEXT_COLUMN, end_id=tok.eos_token_id, block_len=16, keep_remainder=True,
        wrap=None, fingerprint=fingerprint,
    )  # fmt: skip


def test_a_streamed_corpus_packs_into_the_same_blocks(
    clm_tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """txt (lines with blank ones, a byte-order mark, paragraphs) and jsonl with two text
    columns and a null, streamed or prepared: byte-identical block files; the streamed entry
    is keyed by identity, reused by a second stream and not by changed bytes."""
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    monkeypatch.setattr(packing, "SHARD_DOCS", 7)  # many shard boundaries inside blocks
    lines = WIKI.read_text(encoding="utf-8").splitlines()[:300]
    txt = tmp_path / "t.txt"
    txt.write_text("\ufeff" + "\n".join(lines), "utf-8")
    jsonl = tmp_path / "t.jsonl"
    rows = [{"a": a, "b": b or None} for a, b in zip(lines[::2], lines[1::2], strict=False)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), "utf-8")
    cases = [
        ({"files": [str(txt)]}, ["text"]),
        ({"files": [str(txt)], "txt_unit": "paragraph", "max_samples": 9}, ["text"]),
        ({"files": [str(jsonl)]}, ["b", "a"]),
    ]
    for source, columns in cases:
        prepared = load_text(
            [DataSpec(**source)],
            columns,
            data_field="w",
            column_field="w",
            cache_dir=tmp_path / "hf",
        )
        streamed = load_streamed_text(
            [DataSpec(**source, streaming=True)], columns, data_field="w", column_field="w"
        )
        assert isinstance(streamed.dataset, datasets.IterableDataset)
        want, got = _pack(prepared, clm_tok), _pack(streamed.dataset, clm_tok, streamed.fingerprint)
        assert got.path != want.path and got.n_blocks == want.n_blocks > 10
        assert (got.path / packing.BLOCKS_FILE).read_bytes() == (
            want.path / packing.BLOCKS_FILE
        ).read_bytes()
        assert np.array_equal(got.token_counts(), want.token_counts())
    # A mix of a streamed and a prepared source: one stream, the two texts one after another.
    mixed = load_streamed_text(
        [DataSpec(files=[str(txt)], streaming=True), DataSpec(files=[str(jsonl)])],
        ["text", "a"], data_field="w", column_field="w", cache_dir=tmp_path / "hf",
    )  # fmt: skip
    whole = load_text(
        [DataSpec(files=[str(txt)]), DataSpec(files=[str(jsonl)])],
        ["text", "a"], data_field="w", column_field="w", cache_dir=tmp_path / "hf",
    )  # fmt: skip
    assert [r[TEXT_COLUMN] for r in mixed.dataset] == whole[TEXT_COLUMN]
    # The key: the same bytes under another name reuse the entry; one changed byte does not.
    key = load_streamed_text([DataSpec(files=[str(txt)], streaming=True)], ["text"], data_field="w",
                             column_field="w").fingerprint  # fmt: skip
    copy = tmp_path / "copy.txt"
    copy.write_bytes(txt.read_bytes())
    same = load_streamed_text([DataSpec(files=[str(copy)], streaming=True)], ["text"], data_field="w",
                              column_field="w").fingerprint  # fmt: skip
    copy.write_text("\ufeff" + "\n".join([lines[0] + "!", *lines[1:]]), "utf-8")
    changed = load_streamed_text([DataSpec(files=[str(copy)], streaming=True)], ["text"],
                                 data_field="w", column_field="w").fingerprint  # fmt: skip
    assert key == same != changed


STREAMED_RECIPE = scale.RECIPE.replace(
    "    data: {{files: [{text}]}}\n    validation_fraction: 0.05\n",
    "    data: {{files: [{text}], streaming: true}}\n"
    "    validation: {{files: [{val}], streaming: true}}\n",
)


@pytest.mark.slow  # four minutes on the loaded 2-core machine
def test_kill9_mid_epoch_on_a_streamed_corpus_then_resume_is_identical(tmp_path: Path) -> None:
    """kill -9 while a mid-epoch checkpoint is being marked complete; the rerun resumes on the
    streamed corpus's cached blocks and ends with the uninterrupted run's loss curve and weights."""
    if not WIKI.exists():
        pytest.skip("shared data not found")
    assert "streaming: true" in STREAMED_RECIPE
    lines = WIKI.read_text(encoding="utf-8").splitlines()
    text, val = tmp_path / "corpus.txt", tmp_path / "val.txt"
    text.write_text("\n".join(lines[:1500]), "utf-8")
    val.write_text("\n".join(lines[1500:1700]), "utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(STREAMED_RECIPE.format(text=text, val=val), "utf-8")
    ref_dir = tmp_path / "ref"
    done = scale._run(["run", recipe, "--run-dir", ref_dir], tmp_path, tmp_path / "cache-ref")
    assert done.returncode == 0, done.stderr[-3000:]
    assert relkit.read_json(ref_dir / "metrics.json")["pre"]["train_blocks"] > 8 * 4  # mid-epoch
    # Streamed: no Arrow copy of the validation text was prepared, and the only one of the
    # corpus is the tokenizer stage's (one datasets builder folder, keyed by the files read).
    assert len({p.parent for p in ref_dir.rglob("*.arrow")}) == 1

    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    cmd = ["run", recipe, "--run-dir", run_dir]
    proc = scale._spawn(cmd, tmp_path, cache_dir, r"/pre/checkpoints/checkpoint-4/COMPLETE$", "k")
    proc.wait_paused()
    proc.kill()
    res = scale._run(cmd, tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing cache entry" in res.stderr and "resum" in res.stderr.lower()
    assert relkit.loss_curve(run_dir / "pre" / "metrics.jsonl") == relkit.loss_curve(
        ref_dir / "pre" / "metrics.jsonl"
    )
    assert relkit.tree_hashes(run_dir / "pre" / "final") == relkit.tree_hashes(
        ref_dir / "pre" / "final"
    )
