"""The same tokenizer recipe gives the same tokenizer on every run.

tokenizers' WordPiece trainer creates its ``##`` continuation tokens in the iteration order of a
Rust hash map seeded per process (huggingface/tokenizers#1794), so the same recipe numbered the
same vocabulary differently on every run, and since those ids break ties between merges, often
learned a different vocabulary. The stage registers the continuation tokens before training and
renumbers the result canonically. Byte-level BPE has no continuation tokens and its alphabet is
sorted: the same recipe gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlsteps.context import StageContext
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
WIKI = SHARED / "wikitext-2" / "valid.txt"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_TRAIN = """
import sys
from pathlib import Path
from mlsteps.context import StageContext
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer
spec = {"kind": "tokenizer", "vocab_size": 600, "algorithm": sys.argv[2], "target": sys.argv[3],
        "data": {"files": [sys.argv[4]], "max_samples": 600}}
ctx = StageContext(run_dir=Path(sys.argv[1]), stage="tok", kind="tokenizer", seed=0, quiet=True)
tokenizer.run(TokenizerSpec.model_validate(spec), ctx)
"""


# The stage's WordPiece training alone (no datasets/transformers import: a process starts in 1 s).
_TRAIN_WORDPIECE = """
import sys
from pathlib import Path
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer
lines = Path(sys.argv[1]).read_text().splitlines()
spec = TokenizerSpec.model_validate({"kind": "tokenizer", "vocab_size": 120,
    "algorithm": "wordpiece", "target": "mlm", "data": {"files": [sys.argv[1]]}})
sys.stdout.write(tokenizer.train_wordpiece(spec, lambda: iter([lines]), len(lines)).to_str())
"""


def _wordpiece(tmp_path: Path) -> dict:
    spec = {"kind": "tokenizer", "vocab_size": 600, "algorithm": "wordpiece", "target": "mlm",
            "data": {"files": [str(WIKI)], "max_samples": 600}}  # fmt: skip
    ctx = StageContext(run_dir=tmp_path, stage="tok", kind="tokenizer", seed=0, quiet=True)
    tokenizer.run(TokenizerSpec.model_validate(spec), ctx)
    return json.loads((ctx.final_dir / "tokenizer.json").read_text("utf-8"))


@pytest.fixture
def wiki() -> Path:
    if not WIKI.exists():
        pytest.skip("shared data not found")
    return WIKI


def test_wordpiece_ids_are_canonical(tmp_path: Path, wiki: Path) -> None:
    saved = _wordpiece(tmp_path)
    order = [t for t, _ in sorted(saved["model"]["vocab"].items(), key=lambda kv: kv[1])]
    # Special tokens first, in their trained order (pad = 0: collators rely on it), then the
    # rest by text: the ids follow from the vocabulary alone, not from the trainer's hash order.
    assert order[:5] == SPECIALS
    assert order[5:] == sorted(order[5:])
    assert [(a["content"], a["id"]) for a in saved["added_tokens"]] == [
        (t, i) for i, t in enumerate(SPECIALS)
    ]
    # The post-processor's [CLS]/[SEP] ids are the renumbered ones.
    single = saved["post_processor"]["special_tokens"]
    assert single["[CLS]"]["ids"] == [2] and single["[SEP]"]["ids"] == [3]


def test_renumbering_depends_on_the_vocabulary_only(tmp_path: Path, wiki: Path) -> None:
    saved = _wordpiece(tmp_path)
    vocab = saved["model"]["vocab"]
    shuffled = [t for t in vocab if t not in SPECIALS]
    random.Random(0).shuffle(shuffled)  # another run's hash order
    other = dict(saved, model={**saved["model"], "vocab": {
        t: i for i, t in enumerate(SPECIALS + shuffled)}})  # fmt: skip
    other.pop("post_processor")
    again = tokenizer.canonical_wordpiece_ids(Tokenizer.from_str(json.dumps(other)))
    assert json.loads(again.to_str())["model"]["vocab"] == vocab
    text = "The game 's release was delayed until 2011 ."
    original = Tokenizer.from_str(json.dumps(saved))
    plain = {"add_special_tokens": False}
    assert again.encode(text, **plain).tokens == original.encode(text, **plain).tokens


def test_byte_level_bpe_is_the_same_file_in_another_process(tmp_path: Path, wiki: Path) -> None:
    runs = []
    for i in range(2):  # separate processes: the hash-map seed is per process
        where = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", _TRAIN, str(where), "bpe", "clm", str(wiki)],
                       check=True, capture_output=True)  # fmt: skip
        runs.append((where / "tok" / "final" / "tokenizer.json").read_bytes())
    assert len({hashlib.sha256(r).hexdigest() for r in runs}) == 1


def test_wordpiece_is_the_same_vocabulary_in_every_process(tmp_path: Path) -> None:
    """A corpus full of ties: ten letters, words of 2-6 of them, a small vocabulary. Trained
    without registering the continuation tokens first, 8 processes learned 2 different
    vocabularies (4 and 4); with it, every process writes the same file."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 6))) for _ in range(300)]
    corpus = tmp_path / "ties.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(400)) + "\n")
    runs = []
    for _ in range(6):  # separate processes: the hash-map seed is per process
        done = subprocess.run([sys.executable, "-c", _TRAIN_WORDPIECE, str(corpus)],
                              check=True, capture_output=True)  # fmt: skip
        runs.append(done.stdout)
    assert len({hashlib.sha256(r).hexdigest() for r in runs}) == 1
    saved = json.loads(runs[0])
    # The registered continuation tokens are ordinary vocabulary, not special tokens.
    assert [a["content"] for a in saved["added_tokens"]] == SPECIALS
    assert "##a" in saved["model"]["vocab"]
    encoded = Tokenizer.from_str(runs[0].decode()).encode(words[0], add_special_tokens=False)
    assert "".join(t.removeprefix("##") for t in encoded.tokens) == words[0]
