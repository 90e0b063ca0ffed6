"""Pretraining data larger than memory: shard-by-shard packing into a memory-mapped block file,
the packed-data cache keyed by content, and exact resume after kill -9 (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from mlsteps import cache
from mlsteps.context import StageContext
from mlsteps.engine.data import TEXT_COLUMN, load_text
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer as tokenizer_stage
from mlsteps.stages.pretrain import lm_data, packing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
import relkit  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not WIKI.exists():
        pytest.skip("shared data not found")
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for name, target, vocab in [("clm", "clm", 300), ("mlm", "mlm", 300), ("clm2", "clm", 310)]:
        ctx = StageContext(run_dir=root, stage=name, kind="tokenizer", seed=0, quiet=True)
        spec = TokenizerSpec.model_validate(
            {
                "kind": "tokenizer",
                "data": {"files": [str(WIKI)], "max_samples": 300},
                "vocab_size": vocab,
                "target": target,
            }
        )
        tokenizer_stage.run(spec, ctx)
        out[name] = ctx.final_dir
    return out


def _text(path: Path, cache_dir: Path) -> datasets.Dataset:
    return load_text(
        [DataSpec(files=[str(path)])],
        ["text"],
        data_field="w",
        column_field="w",
        cache_dir=cache_dir,
    )


def _brute_force(ds: datasets.Dataset, tok, end_id: int, block_len: int, wrap, keep: bool):
    """The old in-memory packing: the whole stream as one list, cut into blocks."""
    docs = [t for t in ds[TEXT_COLUMN] if t]
    stream = list(
        chain.from_iterable(tok(d, add_special_tokens=False)["input_ids"] + [end_id] for d in docs)
    )
    body = block_len - 2 if wrap else block_len
    pieces = [stream[i : i + body] for i in range(0, len(stream), body)]
    if pieces and len(pieces[-1]) < body and not (keep and len(pieces[-1]) >= 2):
        pieces.pop()
    return [[wrap[0], *p, wrap[1]] if wrap else p for p in pieces]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_sharded_packing_equals_whole_stream_packing(
    objective: str, tok_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    monkeypatch.setattr(packing, "SHARD_DOCS", 7)  # many shard boundaries inside blocks
    tok = AutoTokenizer.from_pretrained(tok_dirs[objective])
    src = tmp_path / "t.txt"
    src.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:400]), "utf-8")
    ds = _text(src, tmp_path / "hf")
    if objective == "clm":
        end, wrap = tok.eos_token_id, None
    else:
        end, wrap = tok.sep_token_id, (tok.cls_token_id, tok.sep_token_id)
    for keep in (False, True):
        blocks = packing.pack_corpus(
            ds,
            tok,
            TEXT_COLUMN,
            end_id=end,
            block_len=16,
            keep_remainder=keep,
            wrap=wrap,
        )
        expected = _brute_force(ds, tok, end, 16, wrap, keep)
        assert [b["input_ids"] for b in blocks] == expected
        assert isinstance(blocks._data(), np.memmap)
        flat = np.fromiter(chain.from_iterable(expected), dtype=np.int64)
        counts = np.bincount(flat)
        assert np.array_equal(blocks.token_counts(), counts)
        assert blocks.n_tokens == len(flat)
        assert lm_data.seen_token_ids(blocks, 300).tolist() == np.nonzero(counts[:300])[0].tolist()


def test_cache_hits_by_content_and_misses_on_any_change(
    tok_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    tok = AutoTokenizer.from_pretrained(tok_dirs["clm"])
    lines = WIKI.read_text(encoding="utf-8").splitlines()[:300]
    a, b = tmp_path / "a" / "t.txt", tmp_path / "b" / "copy.txt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("\n".join(lines), "utf-8")
    logs: list[str] = []

    def pack(ds, tokenizer=tok, block_len=16, keep=False):  # type: ignore[no-untyped-def]
        return packing.pack_corpus(
            ds, tokenizer, TEXT_COLUMN, end_id=tokenizer.eos_token_id, block_len=block_len,
            keep_remainder=keep, wrap=None, log=logs.append,
        )  # fmt: skip

    first = pack(_text(a, tmp_path / "hf1"))
    assert "written" in logs[-1]
    # The same text elsewhere, loaded through another run's datasets cache: the same entry.
    again = pack(_text(b, tmp_path / "hf2"))
    assert "reusing" in logs[-1] and again.path == first.path
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in first]
    changed = tmp_path / "c.txt"
    changed.write_text("\n".join([lines[0] + "!", *lines[1:]]), "utf-8")
    variants = [
        pack(_text(changed, tmp_path / "hf3")),
        pack(_text(a, tmp_path / "hf1"), block_len=17),
        pack(_text(a, tmp_path / "hf1"), keep=True),
        pack(_text(a, tmp_path / "hf1"), tokenizer=AutoTokenizer.from_pretrained(tok_dirs["clm2"])),
        # A different row selection of the same text (the held-out split of another seed).
        pack(_text(a, tmp_path / "hf1").train_test_split(test_size=20, seed=1)["train"]),
    ]
    paths = {first.path, *(v.path for v in variants)}
    assert len(paths) == 6, "a changed input reused another input's packed blocks"
    assert len(cache.entries()) == 6


def test_eval_batches_are_lazy_and_fixed(tok_dirs: dict[str, Path]) -> None:
    """MLM validation masks stay those of one in-order pass, however often they are read."""
    tok = AutoTokenizer.from_pretrained(tok_dirs["mlm"])
    rows = [{"input_ids": [tok.cls_token_id, *range(10, 20), tok.sep_token_id]} for _ in range(5)]
    masker = lm_data.MaskingCollator(tok, probability=0.3, whole_word=False, seed=3)
    eager = [masker(rows[i : i + 2]) for i in range(0, 5, 2)]
    lazy = lm_data.eval_batches(
        rows, lm_data.MaskingCollator(tok, probability=0.3, whole_word=False, seed=3), 2
    )
    for _ in range(2):
        assert len(lazy) == 3
        for got, want in zip(lazy, eager, strict=True):
            assert all(bool((got[k] == want[k]).all()) for k in want)


RECIPE = """\
name: scale
seed: 3
defaults:
  train: {{batch_size: 4, log_every_steps: 1, save_every_steps: 2, keep_checkpoints: 2,
          precision: fp32, lr: 1.0e-3, warmup_steps: 0}}
stages:
  tok:
    kind: tokenizer
    data: {{files: [{text}], max_samples: 300}}
    vocab_size: 300
  pre:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {{family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 64}}
    data: {{files: [{text}]}}
    validation_fraction: 0.05
    max_seq_len: 32
    train: {{max_steps: 8}}
"""


@pytest.mark.slow
def test_kill9_while_packing_and_mid_epoch_then_resume_is_identical(tmp_path: Path) -> None:
    """kill -9 at the moment a packed entry is being published, then mid-epoch (a checkpoint
    being marked complete): the reruns reach the uninterrupted run's loss curve and weights."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:1500]), "utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(text=text), "utf-8")
    ref_cache, cache_dir = tmp_path / "cache-ref", tmp_path / "cache"
    ref_dir = tmp_path / "ref"
    done = _run(["run", recipe, "--run-dir", ref_dir], tmp_path, ref_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = relkit.read_json(ref_dir / "metrics.json")["pre"]
    # Mid-epoch: the kill below lands at step 4 of an epoch of more than 8 steps.
    assert metrics["train_blocks"] > 8 * 4

    run_dir = tmp_path / "run"
    cmd = ["run", recipe, "--run-dir", run_dir]
    # 1. kill -9 just before the packed training blocks are renamed into the cache.
    proc = _spawn(cmd, tmp_path, cache_dir, r"/packed/[0-9a-f]{32}$", "k1")
    proc.wait_paused()
    proc.kill()
    assert cache.entries(cache_dir) == [] and cache.partials(cache_dir), "no partial entry left"
    # 2. kill -9 mid-epoch, while checkpoint-4 is being marked complete.
    proc = _spawn(cmd, tmp_path, cache_dir, r"/pre/checkpoints/checkpoint-4/COMPLETE$", "k2")
    proc.wait_paused()
    proc.kill()
    assert len(cache.entries(cache_dir)) == 2  # training and validation blocks
    # 3. The rerun resumes from checkpoint-2 on the cached blocks and ends where the reference did.
    res = _run(cmd, tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing cache entry" in res.stderr
    assert relkit.loss_curve(run_dir / "pre" / "metrics.jsonl") == relkit.loss_curve(
        ref_dir / "pre" / "metrics.jsonl"
    )
    ours = relkit.tree_hashes(run_dir / "pre" / "final")
    assert ours == relkit.tree_hashes(ref_dir / "pre" / "final")
    # 4. clear removes the entries and the killed writer's partial entry, nothing else.
    foreign = cache_dir / "packed" / "not-ours"
    foreign.mkdir()
    (cache_dir / "keep.txt").write_text("x")
    assert cache.clear(cache_dir)[0] == 3
    assert sorted(p.name for p in (cache_dir / "packed").iterdir()) == ["not-ours"]
    assert (cache_dir / "keep.txt").exists()


def _run(cmd: list, cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(relkit.PYTHON), "-m", "mlsteps", *map(str, cmd)],
        cwd=cwd,
        env=relkit.subprocess_env(MLSTEPS_CACHE=str(cache_dir)),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _spawn(cmd: list, cwd: Path, cache_dir: Path, fault: str, tag: str) -> relkit.Proc:
    """relkit.spawn with this test's cache directory in the subprocess environment."""
    old = os.environ.get("MLSTEPS_CACHE")
    os.environ["MLSTEPS_CACHE"] = str(cache_dir)
    try:
        return relkit.spawn(cmd, cwd, fault=fault, tag=tag)
    finally:
        if old is None:
            del os.environ["MLSTEPS_CACHE"]
        else:
            os.environ["MLSTEPS_CACHE"] = old


def _mapped_rss_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) >= 6 and os.path.realpath(head[-1]) == os.path.realpath(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_read_arrow_pages_leave_the_resident_set_and_data_stays(tmp_path: Path) -> None:
    """RSS must not grow with the corpus: pages of the memory-mapped text that packing has read
    are dropped from the process (the kernel keeps them cached) and read back unchanged."""
    src = tmp_path / "t.txt"
    src.write_text(WIKI.read_text(encoding="utf-8") * 3, "utf-8")
    ds = _text(src, tmp_path / "hf")
    arrow = ds.cache_files[0]["filename"]
    before = [b[TEXT_COLUMN] for b in ds.iter(batch_size=1000)]
    assert _mapped_rss_kb(arrow) > 1000  # the whole ~3 MB file is resident now
    packing.release_file_pages([arrow])
    assert _mapped_rss_kb(arrow) < 100
    assert [b[TEXT_COLUMN] for b in ds.iter(batch_size=1000)] == before


def test_memmap_blocks_drop_their_pages_while_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [list(range(i, i + 1024)) for i in range(0, 2048 * 64, 2048)]
    blocks = packing.pack_token_rows(rows, 1024, keep_remainder=False)
    path = str(blocks.path / packing.BLOCKS_FILE)
    monkeypatch.setattr(packing, "RELEASE_BYTES", 1 << 30)
    want = [blocks[i]["input_ids"] for i in range(len(blocks))]
    assert _mapped_rss_kb(path) >= 200  # 64 blocks x 4 KiB, all touched
    monkeypatch.setattr(packing, "RELEASE_BYTES", 8 * 4096)
    got = [blocks[i]["input_ids"] for i in range(len(blocks))]
    # At most the blocks since the last release plus the kernel's fault-around (64 KiB).
    assert got == want and _mapped_rss_kb(path) <= 8 * 4 + 64
