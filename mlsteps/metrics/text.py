"""Corpus BLEU / chrF / TER (sacrebleu) and ROUGE-1/2/L/Lsum (rouge-score).

Only stage code imports this module (it loads sacrebleu and rouge-score).

Language handling. The target language (``target_lang``, or a guess from the references' script
when it is not given) picks the tokenisation:

- BLEU: ``zh`` for Chinese, ``ja-mecab`` / ``ko-mecab`` for Japanese / Korean where MeCab and its
  dictionary are installed, else ``char``; ``char`` for other scripts written without spaces
  (Thai, Lao, Khmer, Burmese); ``13a`` otherwise (sacrebleu's default).
- TER: for Chinese/Japanese/Korean ``normalized=True, asian_support=True`` (tercom's ``-N
  -asian``: CJK characters are split one per token); plain TER otherwise.
- chrF: character n-grams need no tokenisation (sacrebleu defaults, chrF2, no word n-grams).
- ROUGE: English (and unknown Latin-script text) uses rouge-score's own tokenizer with the
  Porter stemmer, i.e. exactly ``RougeScorer(types, use_stemmer=True)``. Every other language uses
  a Unicode tokenizer (lowercase, one token per Han/kana/Thai character even inside Latin or digit
  runs, Hangul and other letter/digit runs as words, no stemming): rouge-score's default drops every non-ASCII character and scores identical
  Chinese strings 0. rougeLsum gets one sentence per line (split after ``。！？``, and after ``. ! ?`` followed
  by space and a word not starting in lower case). Several references: the best reference per example and type
  (rouge-score's ``score_multi``); the corpus score is the mean F-measure over examples, in [0, 1].

BLEU/chrF/TER are on sacrebleu's 0-100 scale; the signature string goes next to each score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

from mlsteps.errors import HERE, UserError
from mlsteps.metrics.classification import as_reference_lists, check_pairs

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
CJK_LANGS = frozenset({"zh", "ja", "ko"})
# Scripts written without spaces between words: scored by character.
CHAR_LANGS = frozenset({"th", "lo", "km", "my", "bo"})
_LANG_ALIASES = {"cmn": "zh", "yue": "zh", "wuu": "zh", "jpn": "ja", "kor": "ko", "tha": "th"}

_HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_KANA_RE = re.compile("[\u3040-\u309f\u30a0-\u30ff]")
_HANGUL_RE = re.compile("[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
_THAI_RE = re.compile("[\u0e00-\u0e7f]")
# Scripts written without spaces between words (Han, kana, Thai, Lao, Burmese, Khmer, Tibetan):
# one token per character.
_PER_CHAR = (
    "\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u0f00-\u0fff"
)
# Hangul: Korean separates words with spaces, so a run of syllables is one word (per-syllable
# tokens would credit shared syllables of different words), but cut where another script starts.
_HANGUL = "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
# A letter/digit run must exclude those scripts: otherwise it runs on through them and
# '20世纪初' or 'BERT模型' become single tokens.
_UNICODE_TOKEN_RE = re.compile(f"[{_PER_CHAR}]|[{_HANGUL}]+|[^\\W_{_PER_CHAR}{_HANGUL}]+")
_SENTENCE_ENDS_LATIN = ".!?"
_SENTENCE_ENDS_CJK = "。！？"
# Abbreviations whose full stop does not end a sentence even before a capital ("e.g. BERT").
_ABBREVIATIONS = frozenset(
    "e.g i.e cf vs al fig figs eq eqs sec no nos approx resp dr mr mrs ms prof st jr sr".split()
)
_CLOSERS = "\"'”’»)]」』）"


def _primary_subtag(lang: str) -> str:
    primary = lang.strip().lower().replace("_", "-").split("-")[0]
    return _LANG_ALIASES.get(primary, primary)


def resolve_language(target_lang: str | None, references: Sequence[Sequence[str]]) -> str | None:
    """Primary language subtag from ``target_lang``; without it, a guess from the script.

    The guess only distinguishes scripts that change tokenisation (zh/ja/ko/th); it returns
    None for everything else (treated like English).
    """
    if target_lang:
        return _primary_subtag(target_lang)
    sample = "".join(r for refs in references[:500] for r in refs)
    letters = sum(ch.isalpha() for ch in sample) or 1
    if len(_KANA_RE.findall(sample)) / letters > 0.05:
        return "ja"
    if len(_HAN_RE.findall(sample)) / letters > 0.3:
        return "zh"
    if len(_HANGUL_RE.findall(sample)) / letters > 0.3:
        return "ko"
    if len(_THAI_RE.findall(sample)) / letters > 0.3:
        return "th"
    return None


@lru_cache(maxsize=4)
def _mecab_available(tokenizer_name: str) -> bool:
    from sacrebleu.metrics.bleu import BLEU

    try:
        BLEU(tokenize=tokenizer_name)
    except Exception:  # ImportError or a missing dictionary: fall back to characters
        return False
    return True


def bleu_tokenizer(lang: str | None) -> str:
    """sacrebleu tokenizer name for a target language (see the module docstring)."""
    if lang == "zh":
        return "zh"
    if lang in ("ja", "ko"):
        name = f"{lang}-mecab"
        return name if _mecab_available(name) else "char"
    if lang in CHAR_LANGS:
        return "char"
    return "13a"


def _prepare(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    check_pairs(len(predictions), len(references))
    hyps = []
    for i, hyp in enumerate(predictions):
        if not isinstance(hyp, str):
            raise UserError(
                f"prediction {i} is {type(hyp).__name__}, expected a string", field=HERE
            )
        hyps.append(hyp)
    return hyps, as_reference_lists(references)


def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference slot; rows with fewer refs pad with None."""
    n_streams = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]


def _corpus(metric: Any, name: str, hyps: list[str], refs: list[list[str]]) -> dict[str, Any]:
    score = metric.corpus_score(hyps, _ref_streams(refs))
    return {name: float(score.score), f"{name}_signature": str(metric.get_signature())}


def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    target_lang: str | None = None,
) -> dict[str, Any]:
    """Corpus BLEU with the tokenizer of the target language: ``{bleu, bleu_signature}``."""
    hyps, refs = _prepare(predictions, references)
    metric = sacrebleu.BLEU(tokenize=bleu_tokenizer(resolve_language(target_lang, refs)))
    return _corpus(metric, "bleu", hyps, refs)


def chrf(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
) -> dict[str, Any]:
    """Corpus chrF (sacrebleu defaults: chrF2, char order 6): ``{chrf, chrf_signature}``."""
    hyps, refs = _prepare(predictions, references)
    return _corpus(sacrebleu.CHRF(), "chrf", hyps, refs)


def ter(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    target_lang: str | None = None,
) -> dict[str, Any]:
    """Corpus TER (lower is better); CJK targets split per character: ``{ter, ter_signature}``."""
    hyps, refs = _prepare(predictions, references)
    asian = resolve_language(target_lang, refs) in CJK_LANGS
    metric = sacrebleu.TER(normalized=asian, asian_support=asian)
    return _corpus(metric, "ter", hyps, refs)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: existing newlines, after ``。！？``, and after ``. ! ?`` followed by
    whitespace and a word that does not start in lower case or with a bracket.

    Closing quotes/brackets right after the terminator stay with the sentence they close.
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        start = i = 0
        while i < len(line):
            ch = line[i]
            if ch in _SENTENCE_ENDS_LATIN or ch in _SENTENCE_ENDS_CJK:
                cjk = ch in _SENTENCE_ENDS_CJK
                j = i + 1
                while j < len(line) and (
                    line[j] in _SENTENCE_ENDS_LATIN
                    or line[j] in _SENTENCE_ENDS_CJK
                    or line[j] in _CLOSERS
                ):
                    cjk = cjk or line[j] in _SENTENCE_ENDS_CJK
                    j += 1
                # A Latin terminator ends a sentence only before whitespace and a word that does
                # not start in lower case: "3.5", "e.g. the", "et al. (2019)" stay together.
                rest = line[j:].lstrip()
                word = line[start:i].rsplit(None, 1)[-1].lower() if line[start:i].strip() else ""
                latin_end = (
                    bool(rest)
                    and line[j].isspace()
                    and not rest[0].islower()
                    and rest[0] not in "(["
                    and not (ch == "." and word.strip("([") in _ABBREVIATIONS)
                )
                if cjk or not rest or latin_end:
                    sentences.append(line[start:j].strip())
                    start = j
                i = j
            else:
                i += 1
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


class UnicodeTokenizer:
    """rouge-score tokenizer for non-English text: lowercase; one token per character of scripts
    written without spaces (Han, kana, Thai, ...), also right after Latin letters or digits
    ('使用BERT模型' -> 使 用 bert 模 型); runs of Hangul syllables and runs of other letters/digits
    as words; punctuation dropped."""

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_TOKEN_RE.findall(text.lower())


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    target_lang: str | None = None,
) -> dict[str, Any]:
    """Mean F-measure of rouge1/2/L/Lsum over examples (best reference each), plus
    ``rouge_convention`` describing tokenizer, stemming and sentence splitting."""
    hyps, refs = _prepare(predictions, references)
    lang = resolve_language(target_lang, refs)
    english = lang in (None, "en")
    scorer = rouge_scorer.RougeScorer(
        list(ROUGE_TYPES),
        use_stemmer=english,
        tokenizer=None if english else UnicodeTokenizer(),
    )
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref_list in zip(hyps, refs, strict=True):
        # rougeLsum reads sentences from newlines; the other types ignore them.
        best = scorer.score_multi(
            ["\n".join(split_sentences(r)) for r in ref_list], "\n".join(split_sentences(hyp))
        )
        for key in ROUGE_TYPES:
            totals[key] += best[key].fmeasure
    out: dict[str, Any] = {key: totals[key] / len(hyps) for key in ROUGE_TYPES}
    tokenizer = (
        "rouge-score default + Porter stemmer"
        if english
        else "one token per Han/kana/Thai character (also next to Latin or digits), Hangul and "
        "other letter/digit runs as words, no stemming"
    )
    out["rouge_convention"] = (
        f"rouge-score F-measure on 0-1, mean over {len(hyps)} examples, best of refs; lang:"
        f"{lang or 'en?'}; tokenizer: {tokenizer}; rougeLsum: sentences split after .!? and 。！？"
    )
    return out
