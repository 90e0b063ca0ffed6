"""Builders for the classification sets: ``toy/sentiment`` and ``toy/topic``.

The label is chosen first and the sentence is generated for it, so classes are balanced. Labels
follow simple rules a reader can check (negation flips polarity; after "but" the second clause
decides), which makes the sentiment set learnable but not a bag-of-words lookup.
"""

from __future__ import annotations

import random

from mlsteps.builtin.tasks import Row, distinct
from mlsteps.builtin.world import ANIMALS, COLOURS, DAYS, FEATURES, JOBS, OBJECTS, SIZES, World

POSITIVE = ["good", "lovely", "wonderful", "great", "pleasant", "excellent", "charming", "cheerful"]
NEGATIVE = ["bad", "awful", "terrible", "dull", "unpleasant", "poor", "dreadful", "gloomy"]
LIKE = ["loved", "enjoyed", "liked", "adored"]
DISLIKE = ["hated", "disliked", "could not stand", "did not enjoy"]
INTENSIFIERS = ["", "", "very ", "really ", "quite "]


def _subject(world: World, rng: random.Random) -> str:
    """Something to have an opinion about, drawn from the shared world."""
    town = rng.choice(world.towns)
    person = rng.choice(world.people)
    return rng.choice(
        [
            f"the bread in {town.name}",
            f"the soup at the inn in {town.name}",
            f"the market in {town.name}",
            f"the train to {town.name}",
            f"the {town.feature} in {town.name}",
            f"my visit to {town.name}",
            f"the weather on {rng.choice(DAYS)}",
            f"the {rng.choice(COLOURS)} {rng.choice(OBJECTS)} I bought",
            f"the new {rng.choice(OBJECTS)} of {person.name}",
            f"the song {person.name} sang",
            f"the {rng.choice(JOBS)} in {town.name}",
        ]
    )


def _clause(world: World, rng: random.Random, positive: bool) -> str:
    """A clause with the given polarity, possibly by negating the opposite word."""
    subj = _subject(world, rng)
    form = rng.randrange(3)
    if form == 0:
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        return f"{subj} was {rng.choice(INTENSIFIERS)}{adj}"
    if form == 1:
        # "not bad" is positive, "not good" negative: the label is not one word's polarity.
        adj = rng.choice(NEGATIVE if positive else POSITIVE)
        return f"{subj} was not {adj}"
    return f"I {rng.choice(LIKE if positive else DISLIKE)} {subj}"


def _sentiment_row(world: World, rng: random.Random) -> Row:
    positive = rng.random() < 0.5
    if rng.random() < 0.3:
        # Contrast: the clause after "but" decides, the first one has the opposite polarity.
        text = f"{_clause(world, rng, not positive)}, but {_clause(world, rng, positive)}"
    else:
        text = _clause(world, rng, positive)
        if rng.random() < 0.25:
            text += " and I would go back" if positive else " and I would not go back"
    return {
        "text": text[0].upper() + text[1:] + ".",
        "label": "positive" if positive else "negative",
    }


def sentiment_rows(world: World, rng: random.Random, n: int) -> list[Row]:
    """``n`` distinct sentences labelled "positive" or "negative" (balanced in expectation)."""
    return distinct(lambda: _sentiment_row(world, rng), "text", n)


TOPICS = ["weather", "food", "animals", "travel", "work"]


def _topic_sentence(world: World, rng: random.Random, topic: str) -> str:
    p = rng.choice(world.people)
    town = rng.choice(world.towns).name
    day = rng.choice(DAYS)
    n = rng.randint(2, 12)
    options = {
        "weather": [
            f"It rained all morning in {town}.",
            f"The wind was cold and strong on {day}.",
            f"Snow fell on the hills above {town}.",
            f"The sky over {town} was grey until the sun came out.",
            f"A storm reached {town} on {day} evening.",
            f"It was a hot and dry {day} in {town}.",
        ],
        "food": [
            f"{p.name} baked {n} loaves of bread.",
            f"The soup at the inn in {town} tasted of onions.",
            f"{p.name} ate {n} plums and a piece of cheese.",
            "We cooked fish with carrots for dinner.",
            f"The pie {p.name} made had apples and honey in it.",
            f"On {day} the cook in {town} roasted a chicken.",
        ],
        "animals": [
            f"The {rng.choice(COLOURS)} {rng.choice(ANIMALS)} slept in the barn all day.",
            f"A {rng.choice(SIZES)} {rng.choice(ANIMALS)} ran along the {rng.choice(FEATURES)}.",
            f"{p.name} fed the {rng.choice(ANIMALS)}s at dawn.",
            f"The {rng.choice(ANIMALS)} had {n} young ones in spring.",
            f"A fox was seen near the hen house in {town}.",
            f"{p.name} brushed the coat of the old {rng.choice(ANIMALS)}.",
        ],
        "travel": [
            f"{p.name} took the train from {town} to {rng.choice(world.towns).name}.",
            f"The road from {town} to the coast is long.",
            f"On {day}, we rode a cart to {town}.",
            f"{p.name} packed a bag and left {town} early.",
            f"The ferry to {town} was {n} minutes late.",
            f"{p.name} spent {n} nights at an inn on the way to {town}.",
        ],
        "work": [
            f"{p.name} works as {'an' if p.job[0] in 'aeiou' else 'a'} {p.job} in {town}.",
            f"The {rng.choice(JOBS)} finished {n} orders before lunch.",
            f"{p.name} opened the shop at seven on {day}.",
            f"The workers in {town} were paid on {day}.",
            f"{p.name} asked for a day off from the workshop.",
            f"The new {rng.choice(JOBS)} in {town} started work on {day}.",
        ],
    }[topic]
    return rng.choice(options)


def _topic_row(world: World, rng: random.Random) -> Row:
    topic = rng.choice(TOPICS)
    text = _topic_sentence(world, rng, topic)
    if rng.random() < 0.6:
        second = _topic_sentence(world, rng, topic)
        while second == text:  # a repeated sentence would just be noise
            second = _topic_sentence(world, rng, topic)
        text = f"{text} {second}"
    return {"text": text, "label": topic}


def topic_rows(world: World, rng: random.Random, n: int) -> list[Row]:
    """``n`` distinct one- or two-sentence texts labelled with one of ``TOPICS``."""
    return distinct(lambda: _topic_row(world, rng), "text", n)
