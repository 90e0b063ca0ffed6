"""mlsteps' own builtin data: small, aligned task sets generated from one toy world.

Nothing is downloaded or copied: the world (people, towns, pets, objects) and every sentence come
from the grammar in ``world.py``/``lang.py``, seeded with ``random.Random``, so a name and a seed
give the same rows on every machine and every Python >= 3.10. Generation is pure Python, takes a
fraction of a second per set and is cached per process.

    >>> rows = load_builtin("toy/translate", "train")
    >>> sorted(rows[0])
    ['source', 'target']
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsteps.errors import UserError, did_you_mean
from mlsteps.text_io import atomic_write_jsonl

if TYPE_CHECKING:
    from mlsteps.builtin.world import World

Row = dict[str, str]

__all__ = [
    "DEFAULT_SEED",
    "SPLITS",
    "BuiltinInfo",
    "export_builtin",
    "list_builtin",
    "load_builtin",
]

DEFAULT_SEED = 1234
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class BuiltinInfo:
    """What ``mlsteps data list`` shows about one builtin set."""

    name: str
    description: str
    columns: tuple[str, ...]
    split_sizes: dict[str, int] = field(hash=False)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names, in the order train, validation, test."""
        return tuple(self.split_sizes)

    @property
    def num_rows(self) -> int:
        """Rows over all splits."""
        return sum(self.split_sizes.values())


@dataclass(frozen=True)
class _Spec:
    description: str
    columns: tuple[str, ...]
    sizes: tuple[int, int, int]  # train, validation, test
    # "module:function" of the builder (world, rng, n) -> rows. Named, not imported: the
    # generators are only loaded to generate, so `validate` and `data list` stay fast.
    build: str | None
    # A derived set maps each split of ``parent`` row by row (sizes and splits follow it).
    parent: str | None = None
    derive: str | None = None  # "module:function" (rows, rng) -> rows


def _function(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    where = f"mlsteps.builtin.{module}" if module else __name__  # ":_qa": one of this module's
    func: Callable[..., Any] = getattr(importlib.import_module(where), attr)
    return func


def _translate(world: World, rng: random.Random, n: int) -> list[Row]:
    from mlsteps.builtin.lang import translation_pair
    from mlsteps.builtin.tasks import distinct

    del world  # the translation grammar has its own small vocabulary (see lang.py)

    def make() -> Row:
        source, target = translation_pair(rng)
        return {"source": source, "target": target}

    return distinct(make, "source", n)


def _qa(world: World, rng: random.Random, n: int) -> list[Row]:
    from mlsteps.builtin.tasks import qa_rows

    # One row per fact; shuffle before cutting so every kind of question reaches every split.
    rows = qa_rows(world, rng)
    rng.shuffle(rows)
    if len(rows) < n:
        raise RuntimeError(f"the world has only {len(rows)} facts, {n} wanted")
    return rows[:n]


_SPECS: dict[str, _Spec] = {
    "toy/corpus": _Spec(
        "Pretraining text: short documents about the toy world's people, towns, pets and "
        "small counting stories.",
        ("text",),
        (4000, 200, 200),
        "tasks:corpus_rows",
    ),
    "toy/translate": _Spec(
        "English-like sentences (5-12 words) and their translation into a rule-based made-up "
        "language (own lexicon, subject-object-verb, adjectives after the noun).",
        ("source", "target"),
        (4000, 200, 200),
        ":_translate",
    ),
    "toy/summarize": _Spec(
        "Fact paragraphs (3-5 sentences about one person or town) and a one-sentence summary "
        "derived from them by rule.",
        ("source", "target"),
        (1600, 200, 200),
        "tasks:summarize_rows",
    ),
    "toy/sentiment": _Spec(
        "Opinions about things in the toy world labelled 'positive' or 'negative' (negation "
        "flips, after 'but' the second clause decides).",
        ("text", "label"),
        (3000, 200, 200),
        "classify:sentiment_rows",
    ),
    "toy/topic": _Spec(
        "One or two sentences labelled with their topic: weather, food, animals, travel, work.",
        ("text", "label"),
        (2000, 200, 200),
        "classify:topic_rows",
    ),
    "toy/qa": _Spec(
        "Questions about facts of the toy world with short answers; 'context' is the entity's "
        "profile, 'source'/'target' repeat question/answer. No fact is asked in two splits.",
        ("question", "context", "answer", "source", "target"),
        (2000, 200, 200),
        ":_qa",
    ),
    "toy/chat": _Spec(
        "Conversations ('messages': system/user/assistant turns) asking for toy/translate "
        "translations; some multi-turn. Built from the same split of toy/translate.",
        ("messages",),
        (4000, 200, 200),
        None,
        parent="toy/translate",
        derive="alignment:chat_rows",
    ),
    "toy/preference": _Spec(
        "Preference pairs for toy/translate: 'prompt', 'chosen' = the translation, 'rejected' "
        "= a corruption (a wrong word, two words swapped, truncated), plus 'source'/'target' "
        "and 'corruption'. Built from the same split of toy/translate.",
        ("prompt", "chosen", "rejected", "source", "target", "corruption"),
        (4000, 200, 200),
        None,
        parent="toy/translate",
        derive="alignment:preference_rows",
    ),
    "toy/chat_preference": _Spec(
        "Preference pairs as whole conversations (user turn + correct or corrupted assistant "
        "answer) without a prompt column, like trl-lib/ultrafeedback_binarized.",
        ("chosen", "rejected"),
        (4000, 200, 200),
        None,
        parent="toy/translate",
        derive="alignment:chat_preference_rows",
    ),
    "toy/kto": _Spec(
        "Unpaired feedback for toy/translate (KTO): 'prompt', 'completion', 'label' (true = "
        "the correct translation, false = a corruption), alternating.",
        ("prompt", "completion", "label"),
        (4000, 200, 200),
        None,
        parent="toy/translate",
        derive="alignment:kto_rows",
    ),
}


def list_builtin() -> list[BuiltinInfo]:
    """Every builtin set with its description, columns and split sizes (generates nothing)."""
    return [
        BuiltinInfo(
            name, spec.description, spec.columns, dict(zip(SPLITS, spec.sizes, strict=True))
        )
        for name, spec in _SPECS.items()
    ]


def load_builtin(name: str, split: str, *, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Rows of one split of a builtin set, e.g. ``load_builtin("toy/qa", "validation")``.

    Raises ``UserError`` for an unknown set or split. The rows are fresh copies: callers may
    modify them without affecting the cache.
    """
    _spec(name)
    if split not in SPLITS:
        hint = did_you_mean(split, SPLITS) or f"splits are {', '.join(SPLITS)}"
        raise UserError(f"builtin data set '{name}' has no split '{split}'", hint=hint)
    return [dict(row) for row in _generate(name, seed)[split]]


def export_builtin(name: str, out_dir: Path, *, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write ``<split>.jsonl`` (UTF-8, one JSON object per line) for every split into ``out_dir``.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    Returns the paths in the order train, validation, test.
    """
    _spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in _generate(name, seed).items():
        paths.append(atomic_write_jsonl(out_dir / f"{split}.jsonl", rows))
    return paths


def _spec(name: str) -> _Spec:
    spec = _SPECS.get(name)
    if spec is None:
        available = f"available: {', '.join(_SPECS)}"
        suggestion = did_you_mean(name, _SPECS)
        hint = f"{suggestion} {available}" if suggestion else available
        raise UserError(f"unknown builtin data set '{name}'", hint=hint)
    return spec


@lru_cache(maxsize=4)
def _world(seed: int) -> World:
    from mlsteps.builtin.world import build_world

    return build_world(seed)


@lru_cache(maxsize=32)
def _generate(name: str, seed: int) -> dict[str, tuple[Row, ...]]:
    """All splits of one set. Rows are distinct by construction, shuffled, then cut into
    test / validation / train, so the splits are disjoint and their sizes exact."""
    spec = _SPECS[name]
    # A string seed is hashed with SHA-512 by ``random`` (stable across versions); mixing in
    # the name keeps sets independent: adding a set never changes another one's rows.
    rng = random.Random(f"mlsteps-builtin:{name}:{seed}")
    if spec.parent is not None and spec.derive is not None:
        parent = _generate(spec.parent, seed)
        derive = _function(spec.derive)
        return {split: tuple(derive(list(parent[split]), rng)) for split in SPLITS}
    assert spec.build is not None
    n_train, n_val, n_test = spec.sizes
    rows = _function(spec.build)(_world(seed), rng, n_train + n_val + n_test)
    rng.shuffle(rows)
    return {
        "train": tuple(rows[n_val + n_test :]),
        "validation": tuple(rows[n_test : n_test + n_val]),
        "test": tuple(rows[:n_test]),
    }
