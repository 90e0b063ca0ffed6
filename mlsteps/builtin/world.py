"""The toy world behind every builtin data set: word lists, entities and how to describe them.

Everything here is invented for mlsteps (no outside data). A world is built from one seed with
``random.Random(seed)`` and only uses ``choice``/``randint``/``sample``/``shuffle`` on lists, so the
same seed gives the same world on every machine and every Python >= 3.10 (no ``hash()``, no set
iteration order anywhere).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# --- Word lists -------------------------------------------------------------------------------
# Kept small on purpose: a tiny model should be able to learn the whole vocabulary.

FEMALE_NAMES = ["Ada", "Cora", "Edda", "Gala", "Ines", "Kira", "Mara", "Oona", "Rhea", "Tova"]
FEMALE_NAMES += ["Vera", "Wren", "Yara", "Alba", "Dara", "Fay", "Hana", "Juna", "Lena", "Nora"]
MALE_NAMES = ["Bram", "Dov", "Fenn", "Hob", "Jory", "Lio", "Nils", "Pim", "Sol", "Ugo"]
MALE_NAMES += ["Zed", "Bex", "Cai", "Elis", "Gus", "Ivo", "Kit", "Milo", "Otto", "Tam"]
LAST_NAMES = ["Ashby", "Brook", "Carrow", "Dell", "Ember", "Fallow", "Greer", "Hollis", "Ivers"]
LAST_NAMES += ["Marsh", "Nettle", "Orchard", "Pike", "Quill", "Rook", "Stone", "Thorne", "Vale"]
LAST_NAMES += ["Wick", "Yew", "Alder", "Birch", "Cobb", "Dunn", "Fernley"]
TOWNS = ["Ambermoor", "Brindle", "Cobbleford", "Dunmere", "Elmwick", "Fernhollow", "Greystock"]
TOWNS += ["Hartwell", "Ivydale", "Kestrel", "Lowmarsh", "Millbrook", "Northam", "Oakridge"]
TOWNS += ["Pebbleton", "Quarrydown", "Ravensby", "Saltmere", "Thistlewood", "Westerby"]
PET_NAMES = ["Biscuit", "Pepper", "Moss", "Tuft", "Clover", "Button", "Sprout", "Pebble"]
PET_NAMES += ["Ginger", "Sooty", "Nutmeg", "Bramble", "Dot", "Fudge", "Maple", "Wisp"]

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "grey", "brown", "orange", "pink"]
SIZES = ["tiny", "small", "big", "huge"]
JOBS = ["baker", "farmer", "teacher", "painter", "builder", "fisher", "doctor", "miller"]
JOBS += ["tailor", "sailor", "potter", "weaver", "singer", "gardener", "smith", "clerk"]
ANIMALS = ["cat", "dog", "goat", "horse", "rabbit", "hen", "duck", "pig", "cow", "donkey"]
OBJECTS = ["cup", "hat", "box", "book", "ball", "lamp", "basket", "coat", "boat", "bell"]
OBJECTS += ["kite", "chair", "bag", "key", "drum", "clock"]
FEATURES = ["river", "market", "castle", "harbour", "mill", "bridge", "lake", "library"]
REGIONS = ["north", "south", "east", "west"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBER_WORDS += ["ten", "eleven", "twelve"]

# Plural forms that are not just "+s".
_PLURALS = {"box": "boxes", "loaf": "loaves"}


def plural(noun: str) -> str:
    """English plural of one of the world's nouns."""
    return _PLURALS.get(noun, noun + "s")


def count_noun(n: int, noun: str) -> str:
    """'one cup', 'three cups' -- numbers up to twelve as words, larger ones as digits."""
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {noun if n == 1 else plural(noun)}"


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


# --- Entities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pet:
    """An animal owned by a person."""

    name: str
    kind: str
    colour: str
    size: str
    age: int


@dataclass(frozen=True)
class Thing:
    """An object owned by a person."""

    kind: str
    colour: str
    size: str


@dataclass
class Person:
    """A person of the world. ``friend`` is filled in after everyone exists."""

    first: str
    last: str
    pronoun: str  # "she" or "he"
    age: int
    town: str
    job: str
    colour: str  # favourite colour
    pet: Pet | None
    things: list[Thing]
    friend: str = ""
    name: str = field(init=False)  # full name, unique in the world

    def __post_init__(self) -> None:
        # Stored, not a property: generators format names hundreds of thousands of times.
        self.name = f"{self.first} {self.last}"

    @property
    def possessive(self) -> str:
        """'her' or 'his'."""
        return "her" if self.pronoun == "she" else "his"


@dataclass
class Town:
    """A town of the world."""

    name: str
    size: str  # "small" or "large"
    region: str
    population: int
    feature: str
    neighbour: str = ""


@dataclass
class World:
    """All entities, in a fixed order (lists, never sets, so iteration is deterministic)."""

    people: list[Person] = field(default_factory=list)
    towns: list[Town] = field(default_factory=list)
    # Lookups filled by ``index()``; generators use them instead of scanning ``people``.
    by_name: dict[str, Person] = field(default_factory=dict)
    towns_by_name: dict[str, Town] = field(default_factory=dict)
    residents: dict[str, list[Person]] = field(default_factory=dict)
    pet_owners: list[Person] = field(default_factory=list)

    def index(self) -> None:
        """Build the lookups (lists keep the order of ``people``, so they stay deterministic)."""
        self.by_name = {p.name: p for p in self.people}
        self.towns_by_name = {t.name: t for t in self.towns}
        self.residents = {t.name: [p for p in self.people if p.town == t.name] for t in self.towns}
        self.pet_owners = [p for p in self.people if p.pet is not None]

    def town(self, name: str) -> Town:
        """Look a town up by name."""
        return self.towns_by_name[name]


def build_world(seed: int, n_people: int = 500) -> World:
    """Create the world: every town, ``n_people`` people with unique names, pets and belongings."""
    rng = random.Random(seed)
    world = World()
    for name in TOWNS:
        size = rng.choice(["small", "large"])
        population = rng.randint(80, 900) if size == "small" else rng.randint(1200, 9500)
        world.towns.append(Town(name, size, rng.choice(REGIONS), population, rng.choice(FEATURES)))
    for i, town in enumerate(world.towns):
        # Neighbours form one ring, so every town is mentioned as someone's neighbour.
        town.neighbour = world.towns[(i + 1) % len(world.towns)].name

    first_names = [(n, "she") for n in FEMALE_NAMES] + [(n, "he") for n in MALE_NAMES]
    combos = [(f, p, last) for f, p in first_names for last in LAST_NAMES]
    for first, pronoun, last in rng.sample(combos, n_people):
        pet = None
        if rng.random() < 0.7:
            pet = Pet(
                rng.choice(PET_NAMES),
                rng.choice(ANIMALS),
                rng.choice(COLOURS),
                rng.choice(SIZES),
                rng.randint(1, 15),
            )
        kinds = rng.sample(OBJECTS, rng.randint(1, 2))  # distinct kinds: "the cup" is unambiguous
        things = [Thing(k, rng.choice(COLOURS), rng.choice(SIZES)) for k in kinds]
        world.people.append(
            Person(
                first,
                last,
                pronoun,
                rng.randint(18, 80),
                rng.choice(TOWNS),
                rng.choice(JOBS),
                rng.choice(COLOURS),
                pet,
                things,
            )
        )
    for i, person in enumerate(world.people):
        other = rng.randrange(len(world.people) - 1)
        person.friend = world.people[other if other < i else other + 1].name
    world.index()
    return world


# --- Describing entities ----------------------------------------------------------------------
# Each fact has a few phrasings; the corpus picks among them so a model must learn the fact,
# not one fixed string. Phrasing 0 is the canonical one (QA contexts). ``who`` is the name or
# the capitalised pronoun that starts the sentence.

PERSON_FACTS = ["town", "age", "job", "colour", "pet", "things", "friend"]
TOWN_FACTS = ["size", "region", "population", "feature", "neighbour"]
N_PHRASINGS = 3
FIRST_PHRASINGS = 2  # town phrasings that may open a paragraph (they start with the name)


def person_sentence(p: Person, fact: str, who: str, pick: int = 0) -> str:
    """One sentence (phrasing ``pick`` of ``N_PHRASINGS``) stating ``fact`` about ``p``."""
    poss = p.possessive.capitalize() if who in ("She", "He") else f"{who}'s"
    if fact == "town":
        options = [
            f"{who} lives in {p.town}.",
            f"{who} lives in the town of {p.town}.",
            f"{who} has a house in {p.town}.",
        ]
    elif fact == "age":
        options = [f"{who} is {p.age} years old.", f"{who} is {p.age}.", f"{poss} age is {p.age}."]
    elif fact == "job":
        options = [
            f"{who} works as {article(p.job)} {p.job}.",
            f"{who} is {article(p.job)} {p.job}.",
            f"{who} works as {article(p.job)} {p.job} in {p.town}.",
        ]
    elif fact == "colour":
        options = [
            f"{poss} favourite colour is {p.colour}.",
            f"{who} likes the colour {p.colour} best.",
            f"{who} loves the colour {p.colour}.",
        ]
    elif fact == "pet":
        t = p.pet
        if t is None:
            options = [f"{who} has no pets.", f"{who} does not have a pet.", f"{who} has no pets."]
        else:
            options = [
                f"{who} has {article(t.size)} {t.size} {t.colour} {t.kind} named {t.name}.",
                f"{who} has {article(t.kind)} {t.kind} called {t.name}. "
                f"{t.name} is {t.size} and {t.colour}.",
                f"{poss} {t.kind}, {t.name}, is {t.colour} and {t.age} years old.",
            ]
    elif fact == "things":
        parts = " and ".join(f"{article(t.size)} {t.size} {t.colour} {t.kind}" for t in p.things)
        options = [f"{who} owns {parts}.", f"{who} has {parts} at home.", f"{who} keeps {parts}."]
    elif fact == "friend":
        options = [
            f"{poss} best friend is {p.friend}.",
            f"{who} is friends with {p.friend}.",
            f"{who} often visits {p.friend}.",
        ]
    else:
        raise ValueError(f"unknown person fact {fact!r}")
    return options[pick]


def town_sentence(t: Town, fact: str, who: str, pick: int = 0) -> str:
    """One sentence (phrasing ``pick`` of ``N_PHRASINGS``) stating ``fact`` about town ``t``.

    Phrasings 0 and 1 start with ``who``; phrasing 2 names the town elsewhere, so a paragraph
    only uses it after the first sentence (``FIRST_PHRASINGS``).
    """
    if fact == "size":
        options = [
            f"{who} is a {t.size} town.",
            f"{who} is a {t.size} place.",
            f"{who} is quite a {t.size} town.",
        ]
    elif fact == "region":
        options = [
            f"{who} is in the {t.region}.",
            f"{who} lies in the {t.region}.",
            f"{who} is found in the {t.region}.",
        ]
    elif fact == "population":
        options = [
            f"{who} has {t.population} people.",
            f"{who} is home to {t.population} people.",
            f"{t.population} people live in {t.name}.",
        ]
    elif fact == "feature":
        options = [
            f"{who} is known for its {t.feature}.",
            f"{who} has a famous {t.feature}.",
            f"Visitors come to see the {t.feature} of {t.name}.",
        ]
    elif fact == "neighbour":
        options = [
            f"{who} is next to {t.neighbour}.",
            f"{who} lies close to {t.neighbour}.",
            f"{t.neighbour} is the next town after {t.name}.",
        ]
    else:
        raise ValueError(f"unknown town fact {fact!r}")
    return options[pick]


def person_profile(p: Person) -> str:
    """The canonical paragraph with every fact about ``p`` (used as QA context)."""
    return " ".join(
        person_sentence(p, fact, p.name if i == 0 else p.pronoun.capitalize())
        for i, fact in enumerate(PERSON_FACTS)
    )


def town_profile(t: Town) -> str:
    """The canonical paragraph with every fact about town ``t`` (used as QA context)."""
    return " ".join(
        town_sentence(t, fact, t.name if i == 0 else "It") for i, fact in enumerate(TOWN_FACTS)
    )
