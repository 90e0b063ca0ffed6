"""Builders for the world-based data sets: pretraining corpus, summaries and questions.

Each builder takes the world and a seeded ``random.Random`` and returns rows (``dict[str, str]``).
Rows are produced in a fixed order from that one generator, so output depends only on the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mlsteps.builtin.world import (
    DAYS,
    FIRST_PHRASINGS,
    N_PHRASINGS,
    PERSON_FACTS,
    TOWN_FACTS,
    Person,
    Town,
    World,
    article,
    count_noun,
    person_profile,
    person_sentence,
    town_profile,
    town_sentence,
)

Row = dict[str, str]

# --- toy/corpus -------------------------------------------------------------------------------

FOODS = ["apple", "pear", "egg", "plum", "carrot", "onion", "loaf", "pie"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy"]
PET_ACTIONS = [
    "runs to the river",
    "sleeps in the garden",
    "waits by the door",
    "chases the hens",
    "sits in the sun",
    "walks to the market",
]


def _who(p: Person, first: bool, rng: random.Random) -> str:
    """The name for the first sentence; later the pronoun, sometimes the first name again."""
    if first:
        return p.name
    return p.first if rng.random() < 0.25 else p.pronoun.capitalize()


def _person_doc(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    facts = rng.sample(PERSON_FACTS, rng.randint(3, 6))
    return " ".join(
        person_sentence(p, f, _who(p, i == 0, rng), rng.randrange(N_PHRASINGS))
        for i, f in enumerate(facts)
    )


def _town_doc(world: World, rng: random.Random) -> str:
    t = rng.choice(world.towns)
    facts = rng.sample(TOWN_FACTS, rng.randint(2, 4))
    out = [
        town_sentence(
            t, f, "It" if i else t.name, rng.randrange(N_PHRASINGS if i else FIRST_PHRASINGS)
        )
        for i, f in enumerate(facts)
    ]
    # Residents tie towns to people, so the corpus states each fact from both sides.
    locals_ = world.residents[t.name]
    if locals_:
        chosen = rng.sample(locals_, min(len(locals_), rng.randint(1, 3)))
        names = " and ".join(p.name for p in chosen)
        out.append(f"{names} {'lives' if len(chosen) == 1 else 'live'} in {t.name}.")
    return " ".join(out)


def _pet_doc(world: World, rng: random.Random) -> str:
    p = rng.choice(world.pet_owners)
    pet = p.pet
    assert pet is not None
    out = [
        f"{p.name} has {article(pet.kind)} {pet.kind} named {pet.name}.",
        f"{pet.name} is {pet.size} and {pet.colour}.",
        f"{pet.name} is {pet.age} years old."
        if rng.random() < 0.5
        else f"The {pet.kind} is {count_noun(pet.age, 'year')} old.",
        f"Every morning {pet.name} {rng.choice(PET_ACTIONS)}.",
    ]
    if rng.random() < 0.5:
        out.append(f"{p.pronoun.capitalize()} lives with {pet.name} in {p.town}.")
    return " ".join(out)


def _market_doc(world: World, rng: random.Random) -> str:
    """A short story with counting, so the model has to track a number across sentences."""
    p, q = rng.sample(world.people, 2)
    food = rng.choice(FOODS)
    have = rng.randint(3, 12)
    give = rng.randint(1, have - 1)
    eat = rng.randint(0, have - give)
    she = p.pronoun.capitalize()
    out = [
        f"On {rng.choice(DAYS)}, {p.name} went to the market in {p.town}.",
        f"{she} bought {count_noun(have, food)}.",
        f"{she} gave {count_noun(give, food)} to {q.name}.",
    ]
    if eat:
        out.append(f"Then {p.pronoun} ate {count_noun(eat, food)}.")
    out.append(f"Now {p.pronoun} has {count_noun(have - give - eat, food)}.")
    return " ".join(out)


def _trip_doc(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    home = world.town(p.town)
    dest = world.town(home.neighbour)
    she = p.pronoun.capitalize()
    out = [f"On {rng.choice(DAYS)}, {p.name} walked from {home.name} to {dest.name}."]
    out.append(f"The weather was {rng.choice(WEATHER)}.")
    if p.pet is not None and rng.random() < 0.5:
        out.append(f"{p.possessive.capitalize()} {p.pet.kind} {p.pet.name} came too.")
    out.append(f"{she} stopped to look at the {dest.feature}.")
    friend = world.by_name[p.friend]
    if rng.random() < 0.6:
        out.append(f"Later {p.pronoun} visited {friend.name}, who lives in {friend.town}.")
    return " ".join(out)


_DOC_KINDS = [_person_doc, _person_doc, _town_doc, _pet_doc, _market_doc, _trip_doc]


def corpus_rows(world: World, rng: random.Random, n: int) -> list[Row]:
    """``n`` distinct documents of 3-6 sentences mixing profiles, towns, pets and stories."""
    return distinct(lambda: {"text": rng.choice(_DOC_KINDS)(world, rng)}, "text", n)


# --- toy/summarize ----------------------------------------------------------------------------

# Words a summary may use that are not in its source paragraph (template glue). Tests check that
# every other summary word comes from the source, i.e. the summary is derived, not invented.
SUMMARY_GLUE = frozenset(
    "a an is year old who has and likes with friends from person town in the people known for its "
    "next to named no pets".split()
)
_SUMMARY_FACTS = ["town", "age", "job", "colour", "pet", "friend"]


def _person_summary_pair(p: Person, rng: random.Random) -> Row:
    facts = rng.sample(_SUMMARY_FACTS, rng.randint(3, 5))
    sents = []
    for i, f in enumerate(facts):
        # Pet phrasing 2 omits the size, which the summary states: only use the complete ones.
        pick = rng.randrange(2 if f == "pet" else N_PHRASINGS)
        sents.append(person_sentence(p, f, _who(p, i == 0, rng), pick))
    # The summary always states facts in one fixed order, whatever the paragraph's order.
    noun = p.job if "job" in facts else "person"
    if "age" in facts:
        an = p.age in (11, 18) or str(p.age).startswith("8")
        head = f"{'an' if an else 'a'} {p.age}-year-old {noun}"
    else:
        head = f"{article(noun)} {noun}"
    if "town" in facts:
        head += f" from {p.town}"
    clauses = []
    if "pet" in facts:
        t = p.pet
        clauses.append(
            "has no pets"
            if t is None
            else f"has {article(t.size)} {t.size} {t.colour} {t.kind} named {t.name}"
        )
    if "colour" in facts:
        clauses.append(f"likes {p.colour}")
    if "friend" in facts:
        clauses.append(f"is friends with {p.friend}")
    summary = f"{p.name} is {head}"
    if clauses:
        summary += " who " + " and ".join(clauses)
    return {"source": " ".join(sents), "target": summary + "."}


def _town_summary_pair(t: Town, rng: random.Random) -> Row:
    facts = rng.sample(TOWN_FACTS, rng.randint(3, 5))
    sents = [
        town_sentence(
            t, f, "It" if i else t.name, rng.randrange(N_PHRASINGS if i else FIRST_PHRASINGS)
        )
        for i, f in enumerate(facts)
    ]
    summary = (
        f"{t.name} is {article(t.size)} {t.size} town" if "size" in facts else f"{t.name} is a town"
    )
    if "region" in facts:
        summary += f" in the {t.region}"
    if "population" in facts:
        summary += f" with {t.population} people"
    if "feature" in facts:
        summary += f", known for its {t.feature}"
    if "neighbour" in facts:
        summary += f", next to {t.neighbour}"
    return {"source": " ".join(sents), "target": summary + "."}


def summarize_rows(world: World, rng: random.Random, n: int) -> list[Row]:
    """``n`` distinct (paragraph, one-sentence summary) pairs; about a quarter are about towns."""

    def make() -> Row:
        if rng.random() < 0.25:
            return _town_summary_pair(rng.choice(world.towns), rng)
        return _person_summary_pair(rng.choice(world.people), rng)

    return distinct(make, "source", n)


# --- toy/qa -----------------------------------------------------------------------------------


def _person_questions(p: Person) -> list[tuple[list[str], str]]:
    """(question phrasings, answer) for every fact about ``p``."""
    n = p.name
    qs = [
        ([f"Where does {n} live?", f"In which town does {n} live?"], p.town),
        ([f"How old is {n}?", f"What is the age of {n}?"], str(p.age)),
        ([f"What is the job of {n}?", f"What does {n} work as?"], p.job),
        ([f"What is the favourite colour of {n}?", f"Which colour does {n} like best?"], p.colour),
        ([f"Who is the best friend of {n}?", f"Who is {n} friends with?"], p.friend),
    ]
    if p.pet is not None:
        t = p.pet
        qs += [
            ([f"What animal does {n} have?", f"What kind of pet does {n} have?"], t.kind),
            (
                [f"What is the name of the {t.kind} of {n}?", f"What is {n}'s {t.kind} called?"],
                t.name,
            ),
            ([f"What colour is the {t.kind} of {n}?", f"What colour is {n}'s {t.kind}?"], t.colour),
        ]
    for thing in p.things:
        qs.append(
            (
                [f"What colour is the {thing.kind} of {n}?", f"What colour is {n}'s {thing.kind}?"],
                thing.colour,
            )
        )
    return qs


def _town_questions(t: Town) -> list[tuple[list[str], str]]:
    n = t.name
    return [
        ([f"How many people live in {n}?", f"What is the population of {n}?"], str(t.population)),
        ([f"In which part of the land is {n}?", f"Where is {n}?"], t.region),
        ([f"What is {n} known for?", f"What is famous in {n}?"], t.feature),
        ([f"Which town is next to {n}?", f"What is the next town after {n}?"], t.neighbour),
        ([f"Is {n} a small or a large town?", f"How big is {n}?"], t.size),
    ]


def qa_rows(world: World, rng: random.Random) -> list[Row]:
    """One question per fact of the world (so splits never share a fact), phrasing at random.

    ``source``/``target`` repeat ``question``/``answer`` for closed-book seq2seq recipes; the
    ``context`` column is the entity's canonical profile for open-book ones.
    """
    rows: list[Row] = []
    for p in world.people:
        context = person_profile(p)
        for phrasings, answer in _person_questions(p):
            q = rng.choice(phrasings)
            rows.append(
                {"question": q, "context": context, "answer": answer, "source": q, "target": answer}
            )
    for t in world.towns:
        context = town_profile(t)
        for phrasings, answer in _town_questions(t):
            q = rng.choice(phrasings)
            rows.append(
                {"question": q, "context": context, "answer": answer, "source": q, "target": answer}
            )
    return rows


# --- helpers ----------------------------------------------------------------------------------


def distinct(make: Callable[[], Row], key: str, n: int) -> list[Row]:
    """Call ``make`` until ``n`` rows with distinct ``key`` exist (duplicates would leak across
    splits). Raises if the generator cannot produce that many, instead of looping forever."""
    seen: set[str] = set()
    rows: list[Row] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 20 * n:
            raise RuntimeError(f"only {len(rows)} distinct rows after {tries} tries (wanted {n})")
        row = make()
        if row[key] not in seen:
            seen.add(row[key])
            rows.append(row)
    return rows
