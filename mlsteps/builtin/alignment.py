"""Builtin alignment data: toy conversations and preference pairs, derived from toy/translate.

Every set here is built split by split from the same split of ``toy/translate``, so a test
sentence of the translation task never reaches the training split of a chat or preference set
(the alignment ladder is measured on unseen sentences).

- ``toy/chat``: ``messages`` in the HF/OpenAI convention (``[{role, content}, ...]``): a user asks
  for a translation, the assistant answers; about a third have a system turn, about half a
  second user/assistant exchange (the next sentence of the same split).
- ``toy/preference``: ``prompt`` (the quickstart's template ``"English: ...\\nToy: "``),
  ``chosen`` (the correct translation), ``rejected`` (a plausible corruption of it), plus the
  ``source``/``target`` pair so one eval data set gives both BLEU and preference accuracy, and
  ``corruption`` naming how ``rejected`` was made.
- ``toy/kto``: unpaired ``prompt``/``completion``/``label`` (``True`` = desirable): each sentence
  once, alternately with its correct and a corrupted translation.

Corruptions (each keeps the sentence plausible: real words of the language, a final period):
``wrong_word`` replaces one word by another word of the same lexicon; ``wrong_order`` swaps
two neighbouring words (the SOV order or noun-adjective order breaks); ``truncated`` drops the
last 1-3 words (usually the verb, which comes last).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from mlsteps.builtin.lang import LEXICON

AlignRow = dict[str, Any]
PROMPT_TEMPLATE = "English: {source}\nToy: "
CHAT_REQUEST = "Translate into Toy: {source}"
CHAT_SYSTEM = "You translate English into the Toy language."
CORRUPTIONS = ("wrong_word", "wrong_order", "truncated")

# Target words sorted, so the choice of a replacement never depends on dict/set order.
_TARGET_WORDS = sorted(set(LEXICON.values()))


def _words(sentence: str) -> list[str]:
    """Lower-cased words of a target sentence without the final period."""
    return sentence.rstrip(".").lower().split()


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def corrupt(target: str, kind: str, rng: random.Random) -> str:
    """A plausible wrong translation: ``kind`` is one of ``CORRUPTIONS``; never equal to
    ``target``."""
    words = _words(target)
    if kind == "wrong_word":
        i = rng.randrange(len(words))
        words[i] = rng.choice([w for w in _TARGET_WORDS if w != words[i]])
    elif kind == "wrong_order":
        pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        i = rng.choice(pairs)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "truncated":
        cut = rng.randint(1, min(3, len(words) - 2))
        words = words[:-cut]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    out = _sentence(words)
    assert out != target
    return out


def preference_rows(rows: list[AlignRow], rng: random.Random) -> list[AlignRow]:
    """prompt/chosen/rejected (+ source/target/corruption) for each translation row."""
    out = []
    for row in rows:
        kind = rng.choice(CORRUPTIONS)
        out.append(
            {
                "prompt": PROMPT_TEMPLATE.format(source=row["source"]),
                "chosen": row["target"],
                "rejected": corrupt(row["target"], kind, rng),
                "source": row["source"],
                "target": row["target"],
                "corruption": kind,
            }
        )
    return out


def kto_rows(rows: list[AlignRow], rng: random.Random) -> list[AlignRow]:
    """Unpaired prompt/completion/label rows: even rows correct, odd rows corrupted."""
    out = []
    for i, row in enumerate(rows):
        good = i % 2 == 0
        completion = row["target"] if good else corrupt(row["target"], rng.choice(CORRUPTIONS), rng)
        out.append(
            {
                "prompt": PROMPT_TEMPLATE.format(source=row["source"]),
                "completion": completion,
                "label": good,
            }
        )
    return out


def chat_rows(rows: list[AlignRow], rng: random.Random) -> list[AlignRow]:
    """One conversation per translation row; some with a system turn or a second exchange."""
    out = []
    for i, row in enumerate(rows):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": CHAT_SYSTEM})
        exchanges = [row]
        if rng.random() < 0.5 and len(rows) > 1:
            exchanges.append(rows[(i + 1) % len(rows)])
        for ex in exchanges:
            messages.append({"role": "user", "content": CHAT_REQUEST.format(source=ex["source"])})
            messages.append({"role": "assistant", "content": ex["target"]})
        out.append({"messages": messages})
    return out


Deriver = Callable[[list[AlignRow], random.Random], list[AlignRow]]
