"""Builtin toy-world data: determinism, disjoint splits, task rules, API errors, export."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mlsteps import builtin
from mlsteps.builtin import SPLITS, export_builtin, list_builtin, load_builtin
from mlsteps.builtin.classify import DISLIKE, LIKE, NEGATIVE, POSITIVE, TOPICS
from mlsteps.builtin.lang import LEXICON, VERBS
from mlsteps.builtin.tasks import SUMMARY_GLUE
from mlsteps.errors import UserError

# The alignment sets (toy/chat, toy/preference, toy/chat_preference, toy/kto) derive from toy/translate and hold
# conversations and booleans: tests/integration/test_chat.py and test_preference.py cover them.
ALIGNMENT = {"toy/chat", "toy/preference", "toy/chat_preference", "toy/kto"}
NAMES = [info.name for info in list_builtin() if info.name not in ALIGNMENT]
# The column whose value identifies a row: two splits must never share one.
KEY = {
    "toy/corpus": "text",
    "toy/translate": "source",
    "toy/summarize": "source",
    "toy/sentiment": "text",
    "toy/topic": "text",
    "toy/qa": "question",
}


def _all(name: str) -> dict[str, list[dict[str, str]]]:
    return {split: load_builtin(name, split) for split in SPLITS}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("'s", ""))


def test_expected_sets_are_listed() -> None:
    assert set(NAMES) == set(KEY)
    assert {info.name for info in list_builtin()} == set(KEY) | ALIGNMENT
    for info in list_builtin():
        assert info.description and info.columns
        assert info.splits == SPLITS
        assert info.split_sizes["test"] == 200
        assert info.num_rows == sum(info.split_sizes.values())


def test_seed_changes_rows() -> None:
    assert load_builtin("toy/topic", "train", seed=7) != load_builtin("toy/topic", "train")


def test_rows_are_copies() -> None:
    rows = load_builtin("toy/topic", "test")
    rows[0]["text"] = "changed"
    rows.clear()
    assert load_builtin("toy/topic", "test")[0]["text"] != "changed"


@pytest.mark.parametrize("name", NAMES)
def test_splits_sized_disjoint_with_all_columns(name: str) -> None:
    info = next(i for i in list_builtin() if i.name == name)
    data = _all(name)
    seen: dict[str, str] = {}
    for split, rows in data.items():
        assert len(rows) == info.split_sizes[split]
        for row in rows:
            assert tuple(row) == info.columns
            assert all(isinstance(v, str) and v.strip() for v in row.values())
            key = row[KEY[name]]
            assert key not in seen, f"{key!r} in both {seen.get(key)} and {split}"
            seen[key] = split


def test_translation_is_a_consistent_word_mapping_with_sov_order() -> None:
    mapping: dict[str, str] = {}
    verb_forms = {form for forms in VERBS.values() for form in forms}
    for row in load_builtin("toy/translate", "train"):
        src, tgt = _words(row["source"]), _words(row["target"])
        assert 5 <= len(src) <= 12 and len(src) == len(tgt)
        # Same bag of words under the lexicon: every source word has one fixed translation ...
        assert Counter(LEXICON[w] for w in src) == Counter(tgt)
        for w in src:
            assert mapping.setdefault(w, LEXICON[w]) == LEXICON[w]
        # ... and the order differs by rule: the (only) verb goes last.
        (verb,) = [w for w in src if w in verb_forms]
        assert tgt[-1] == LEXICON[verb]
    # Different lemmas never share a target word (only spelling/agreement variants do).
    assert LEXICON["a"] == LEXICON["an"] and LEXICON["see"] == LEXICON["sees"]
    assert LEXICON["see"] != LEXICON["saw"] and LEXICON["dog"] != LEXICON["dogs"]


def test_summaries_derive_from_their_paragraphs() -> None:
    for row in load_builtin("toy/summarize", "train"):
        source, target = row["source"], row["target"]
        assert 3 <= source.count(".") <= 6  # 3-5 facts; a pet fact may take two sentences
        assert target.count(".") == 1
        subject = target.split(" is ")[0]
        assert source.startswith(subject)
        invented = set(_words(target)) - set(_words(source)) - SUMMARY_GLUE
        assert not invented, f"{invented} not in {source!r}"


def test_classification_labels() -> None:
    sentiment = Counter(r["label"] for r in load_builtin("toy/sentiment", "train"))
    assert set(sentiment) == {"positive", "negative"}
    assert min(sentiment.values()) > 0.4 * sum(sentiment.values())
    for row in load_builtin("toy/sentiment", "test"):
        assert _sentiment_rule(row["text"]) == row["label"], row
    topics = Counter(r["label"] for r in load_builtin("toy/topic", "train"))
    assert set(topics) == set(TOPICS)


def _sentiment_rule(text: str) -> str:
    """The documented labelling rule, re-implemented independently of the generator."""
    clause = text.rstrip(".").split(", but ")[-1]  # after "but" the second clause decides
    clause = re.sub(r" and I would (not )?go back$", "", clause)
    for phrase in ("could not stand", "did not enjoy"):
        clause = clause.replace(phrase, "hated")
    positive = {*POSITIVE, *LIKE}
    (word,) = [w for w in _words(clause) if w in positive or w in {*NEGATIVE, *DISLIKE}]
    polarity = word in positive
    if " not " in f" {clause} ":
        polarity = not polarity
    return "positive" if polarity else "negative"


def test_qa_answers_are_in_the_context() -> None:
    for row in load_builtin("toy/qa", "validation"):
        assert row["answer"] in row["context"]
        assert row["source"] == row["question"] and row["target"] == row["answer"]


def test_unknown_name_or_split_is_a_user_error() -> None:
    with pytest.raises(UserError, match="did you mean 'toy/translate'"):
        load_builtin("toy/translat", "train")
    with pytest.raises(UserError, match="toy/corpus"):
        load_builtin("nothing-like-it", "train")
    with pytest.raises(UserError, match="did you mean 'validation'"):
        load_builtin("toy/qa", "validaton")
    with pytest.raises(UserError):
        export_builtin("toy/nope", Path("unused"))


def test_export_writes_jsonl(tmp_path: Path) -> None:
    paths = export_builtin("toy/summarize", tmp_path / "out")
    assert [p.name for p in paths] == [f"{s}.jsonl" for s in SPLITS]
    for path, split in zip(paths, SPLITS, strict=True):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == load_builtin("toy/summarize", split)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_deterministic_fast_and_small() -> None:
    before = {name: _all(name) for name in NAMES}
    builtin._generate.cache_clear()
    builtin._world.cache_clear()
    total = 0
    for name in NAMES:
        # CPU time, not wall time: a busy machine must not fail this test. Target is < 0.5 s.
        start = time.process_time()
        rows = _all(name)
        assert time.process_time() - start < 1.0, name
        assert rows == before[name], f"{name} differs when generated again"
        total += sum(len(json.dumps(r, ensure_ascii=False)) + 1 for v in rows.values() for r in v)
    assert total < 5_000_000


def test_pinned_digest() -> None:
    """Same bytes on every machine and Python. If you changed the grammar on purpose, update the
    digest (and note it: recipes using builtin data will see different rows)."""
    h = hashlib.sha256()
    for name in NAMES:
        for split, rows in _all(name).items():
            h.update(f"{name}/{split}".encode())
            for row in rows:
                h.update(json.dumps(row, sort_keys=True).encode())
    assert h.hexdigest()[:16] == "12da4123404aaf19"


def test_import_is_light() -> None:
    code = "import sys, mlsteps.builtin; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
