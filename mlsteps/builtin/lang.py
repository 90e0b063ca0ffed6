"""The made-up target language of ``toy/translate`` and the English grammar it translates.

The rules (see docs/builtin-data.md):

- every English word form maps to exactly one target word (``LEXICON``); a few English forms share
  a target word because the target has no agreement ("see"/"sees" -> one word, "a"/"an" -> one);
- nouns take the plural suffix ``-n``; verbs take ``-m`` (present) or ``-t`` (past);
- word order is subject-object-verb: ``SUBJ OBJ PLACE ADVERB VERB``;
- inside a noun phrase adjectives follow the noun (``DET NOUN ADJ*``) and prepositions follow
  their noun phrase (postpositions: ``DET NOUN ADJ* PREP``).

The lexicon is generated from a fixed seed, independent of the data seed, so the language is the
same in every data set and every release.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# --- The English side: a small grammar --------------------------------------------------------

COLOUR_ADJECTIVES = ["red", "blue", "green", "white", "black", "brown"]
OTHER_ADJECTIVES = ["small", "big", "old", "young", "happy", "tired"]
ADJECTIVES = OTHER_ADJECTIVES + COLOUR_ADJECTIVES
AGENTS = ["dog", "cat", "horse", "goat", "duck", "farmer", "baker", "teacher", "boy", "girl"]
THINGS = ["ball", "box", "cup", "hat", "book", "basket", "kite", "apple"]
PLACES = ["park", "river", "market", "house", "garden", "field"]
NOUNS = AGENTS + THINGS + PLACES
# lemma -> (base, 3rd person singular, past)
TRANSITIVE = {
    "see": ("see", "sees", "saw"),
    "like": ("like", "likes", "liked"),
    "find": ("find", "finds", "found"),
    "carry": ("carry", "carries", "carried"),
    "chase": ("chase", "chases", "chased"),
    "follow": ("follow", "follows", "followed"),
    "want": ("want", "wants", "wanted"),
    "watch": ("watch", "watches", "watched"),
}
INTRANSITIVE = {
    "sleep": ("sleep", "sleeps", "slept"),
    "run": ("run", "runs", "ran"),
    "sing": ("sing", "sings", "sang"),
    "wait": ("wait", "waits", "waited"),
    "walk": ("walk", "walks", "walked"),
    "jump": ("jump", "jumps", "jumped"),
}
VERBS = {**TRANSITIVE, **INTRANSITIVE}
PREPOSITIONS = ["in", "near", "behind"]
ADVERBS = ["quickly", "slowly", "again", "quietly"]
# English determiner -> whether the noun after it is plural
DETERMINERS = {"the": False, "a": False, "two": True, "three": True, "some": True}

_PLURAL = {"box": "boxes", "watch": "watches"}


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


# --- The target side: a generated lexicon -----------------------------------------------------

LEXICON_SEED = 20240607  # fixed: changing it changes the language, not just the data
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _build_lexicon() -> dict[str, str]:
    """English word form -> target word, injective on target forms of different lemmas."""
    rng = random.Random(LEXICON_SEED)
    used: set[str] = set()  # membership only, never iterated: order cannot leak into the output

    def stem(syllables: int, suffixes: tuple[str, ...]) -> str:
        # Draw until the stem and every inflected form is new, so distinct lemmas never collide.
        while True:
            s = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
            forms = [s + x for x in suffixes]
            if not any(f in used for f in forms):
                used.update(forms)
                return s

    lex: dict[str, str] = {}
    for det in DETERMINERS:
        lex[det] = stem(1, ("",))
    lex["an"] = lex["a"]  # "a"/"an" is English spelling only
    for prep in PREPOSITIONS:
        lex[prep] = stem(1, ("",))
    for adj in ADJECTIVES + ADVERBS:
        lex[adj] = stem(2, ("",))
    for noun in NOUNS:
        s = stem(2, ("", "n"))
        lex[noun], lex[_plural(noun)] = s, s + "n"
    for base, third, past in VERBS.values():
        s = stem(2, ("m", "t"))
        lex[base] = lex[third] = s + "m"  # no subject agreement in the target
        lex[past] = s + "t"
    return lex


LEXICON: dict[str, str] = _build_lexicon()


# --- Sentences --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    """Determiner, adjectives, noun; ``plural`` follows from the determiner."""

    det: str
    adjs: tuple[str, ...]
    noun: str

    @property
    def plural(self) -> bool:
        """Whether the noun is plural."""
        return DETERMINERS[self.det]

    def english(self) -> list[str]:
        """Words in English order: DET ADJ* NOUN."""
        noun = _plural(self.noun) if self.plural else self.noun
        words = [*self.adjs, noun]
        det = self.det
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return [det, *words]

    def target(self) -> list[str]:
        """Words in target order: DET NOUN ADJ*."""
        det, *rest = self.english()
        return [LEXICON[det], LEXICON[rest[-1]], *(LEXICON[a] for a in rest[:-1])]


def _noun_phrase(rng: random.Random, nouns: list[str]) -> NounPhrase:
    n_adj = rng.choices([0, 1, 2], weights=[4, 4, 2])[0]
    if n_adj == 2:
        adjs: tuple[str, ...] = (rng.choice(OTHER_ADJECTIVES), rng.choice(COLOUR_ADJECTIVES))
    else:
        adjs = tuple(rng.sample(ADJECTIVES, n_adj))  # English order: size/age/mood, then colour
    return NounPhrase(rng.choice(list(DETERMINERS)), adjs, rng.choice(nouns))


def translation_pair(
    rng: random.Random, min_words: int = 5, max_words: int = 12
) -> tuple[str, str]:
    """One random English sentence of ``min_words``..``max_words`` words and its translation."""
    while True:
        subj = _noun_phrase(rng, AGENTS)
        transitive = rng.random() < 0.6
        lemma = rng.choice(list(TRANSITIVE if transitive else INTRANSITIVE))
        base, third, past = VERBS[lemma]
        if rng.random() < 0.5:
            verb = past
        else:
            verb = base if subj.plural else third
        obj = _noun_phrase(rng, AGENTS + THINGS) if transitive else None
        place = None
        if rng.random() < (0.4 if transitive else 0.8):
            place = (rng.choice(PREPOSITIONS), _noun_phrase(rng, PLACES))
        adverb = rng.choice(ADVERBS) if rng.random() < 0.3 else None

        src = [*subj.english(), verb]
        tgt = subj.target()
        if obj is not None:
            src += obj.english()
            tgt += obj.target()
        if place is not None:
            src += [place[0], *place[1].english()]
            tgt += [*place[1].target(), LEXICON[place[0]]]
        if adverb is not None:
            src.append(adverb)
            tgt.append(LEXICON[adverb])
        tgt.append(LEXICON[verb])  # verb-final
        if min_words <= len(src) <= max_words:
            return _sentence(src), _sentence(tgt)


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."
