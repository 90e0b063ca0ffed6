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
- ``toy/chat_preference``: whole conversations ``chosen``/``rejected`` (the same user turn, then
  the correct or a corrupted assistant answer) and no prompt column, as in
  ``trl-lib/ultrafeedback_binarized``.
- ``toy/kto``: unpaired ``prompt``/``completion``/``label`` (``True`` = desirable): each sentence
  once, alternately with its correct and a corrupted translation.

Corruptions keep the sentence fluent, so only the English source tells it is wrong:
``wrong_word`` replaces one word by another of the same class and form (a plural noun by
another plural noun, a past verb by another past verb, a determiner by another determiner);
``wrong_order`` swaps two words of one class (subject and object noun, two adjectives), else two
neighbours; ``truncated`` drops the last 1-2 words (the final verb goes first).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from mlsteps.builtin.lang import (
    ADJECTIVES,
    ADVERBS,
    DETERMINERS,
    LEXICON,
    NOUNS,
    PREPOSITIONS,
    VERBS,
)
from mlsteps.builtin.lang import _plural as plural

AlignRow = dict[str, Any]
PROMPT_TEMPLATE = "English: {source}\nToy: "
CHAT_REQUEST = "Translate into Toy: {source}"
CHAT_SYSTEM = "You translate English into the Toy language."
CORRUPTIONS = ("wrong_word", "wrong_order", "truncated")


def _word_classes() -> dict[str, str]:
    """Target word -> its class and form (noun_sg, noun_pl, verb_pres, verb_past, adj, ...)."""
    classes: dict[str, str] = {}
    for det in DETERMINERS:
        classes[LEXICON[det]] = "det"
    for prep in PREPOSITIONS:
        classes[LEXICON[prep]] = "prep"
    for adj in ADJECTIVES:
        classes[LEXICON[adj]] = "adj"
    for adv in ADVERBS:
        classes[LEXICON[adv]] = "adv"
    for noun in NOUNS:
        classes[LEXICON[noun]] = "noun_sg"
        classes[LEXICON[plural(noun)]] = "noun_pl"
    for base, third, past in VERBS.values():
        classes[LEXICON[base]] = classes[LEXICON[third]] = "verb_pres"
        classes[LEXICON[past]] = "verb_past"
    return classes


WORD_CLASS = _word_classes()
# Words of each class, sorted: the choice never depends on dict or set order.
_BY_CLASS: dict[str, list[str]] = {}
for _word, _cls in sorted(WORD_CLASS.items()):
    _BY_CLASS.setdefault(_cls, []).append(_word)


def _words(sentence: str) -> list[str]:
    """Lower-cased words of a target sentence without the final period."""
    return sentence.rstrip(".").lower().split()


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def corrupt(target: str, kind: str, rng: random.Random) -> str:
    """A fluent wrong translation: ``kind`` is one of ``CORRUPTIONS``; never equal to
    ``target``."""
    words = _words(target)
    if kind == "wrong_word":
        options = [i for i, w in enumerate(words) if len(_BY_CLASS[WORD_CLASS[w]]) > 1]
        i = rng.choice(options)
        words[i] = rng.choice([w for w in _BY_CLASS[WORD_CLASS[words[i]]] if w != words[i]])
    elif kind == "wrong_order":
        same = [
            (i, j)
            for i in range(len(words))
            for j in range(i + 1, len(words))
            if WORD_CLASS[words[i]] == WORD_CLASS[words[j]] and words[i] != words[j]
        ]
        pairs = same or [(i, i + 1) for i in range(len(words) - 1) if words[i] != words[i + 1]]
        i, j = rng.choice(pairs)
        words[i], words[j] = words[j], words[i]
    elif kind == "truncated":
        words = words[: -rng.randint(1, min(2, len(words) - 2))]
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


def chat_preference_rows(rows: list[AlignRow], rng: random.Random) -> list[AlignRow]:
    """Whole conversations ``chosen``/``rejected`` (user turn + assistant turn), no prompt
    column: the layout of trl-lib/ultrafeedback_binarized."""
    out = []
    for row in rows:
        user = {"role": "user", "content": CHAT_REQUEST.format(source=row["source"])}
        bad = corrupt(row["target"], rng.choice(CORRUPTIONS), rng)
        out.append(
            {
                "chosen": [user, {"role": "assistant", "content": row["target"]}],
                "rejected": [user, {"role": "assistant", "content": bad}],
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
