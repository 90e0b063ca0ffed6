"""The `tokenizer` stage: train a tokenizer with the `tokenizers` library, or wrap an existing one.

The result is saved as a transformers fast tokenizer (``tokenizer.json`` + config) in ``final/``,
loadable as is by ``AutoTokenizer.from_pretrained``. Special tokens follow the model family the
tokenizer serves (``target``); their ids come first, so they are the same for every corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.errors import UserError, field_scope
from mlsteps.recipe.specs.tokenizer import SPECIAL_ROLES, TokenizerSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Role -> token text, per naming style. BERT-style names for WordPiece, <x> elsewhere.
_BRACKET = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_ANGLE = {
    "pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "cls": "<s>", "sep": "</s>",
    "mask": "<mask>",
}  # fmt: skip
_ROLES = SPECIAL_ROLES  # per target, in id order; the spec owns them (it checks vocab_size)
_METRIC_SAMPLE_ROWS = 20_000
_BATCH_ROWS = 1_000


def special_tokens(target: str, algorithm: str) -> dict[str, str]:
    """Role -> token text for a target (clm, mlm, seq2seq) and algorithm, in id order."""
    names = _BRACKET if algorithm == "wordpiece" and target == "mlm" else _ANGLE
    return {role: names[role] for role in _ROLES[target]}


def _normalizer(spec: TokenizerSpec) -> Any:
    steps: list[Any] = []
    if spec.normalization == "nfc":
        steps.append(normalizers.NFC())
    elif spec.normalization == "nfkc":
        steps.append(normalizers.NFKC())
    if spec.algorithm == "wordpiece":
        # Spaces around CJK characters make WordPiece usable on Chinese (as in BERT's Chinese model).
        steps.append(
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
            )
        )
    if spec.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def build_untrained(spec: TokenizerSpec, registered: Sequence[str] = ()) -> tuple[Tokenizer, Any]:
    """An untrained ``tokenizers.Tokenizer`` and its trainer for ``spec.algorithm``.

    ``registered``: tokens the trainer creates before anything else, after the special tokens
    (it takes them as special tokens; see ``train_wordpiece``)."""
    specials = [*special_tokens(spec.target, spec.algorithm).values(), *registered]
    unk = special_tokens(spec.target, spec.algorithm)["unk"]
    if spec.algorithm == "bpe":
        # Byte-level: every string is encodable (no unknown tokens), Chinese included.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(
            vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )  # fmt: skip
    elif spec.algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=specials,
            show_progress=False,
        )  # fmt: skip
    else:
        # SentencePiece style: spaces become "▁" and are part of pieces; no word splitting needed,
        # which suits text without spaces (Chinese). min_frequency has no Unigram equivalent.
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size, special_tokens=specials, unk_token=unk, show_progress=False
        )
    tok.normalizer = _normalizer(spec)
    return tok, trainer


def train_wordpiece(
    spec: TokenizerSpec, texts: Callable[[], Iterator[list[str]]], rows: int
) -> Tokenizer:
    """A WordPiece vocabulary that is the same on every run, numbered canonically.

    tokenizers' trainer (0.23) creates the continuation tokens ("##x") lazily while iterating a
    Rust hash map seeded per process, and those ids break ties between equally frequent merges
    (huggingface/tokenizers#1794; the fix, PR #2066, is unmerged). So the same recipe picked
    other merges at the vocabulary cut-off: SST-2, 4,000 tokens, gave 3 different vocabularies in
    6 processes, and the MLM pretrained on them ended at perplexity 161 or 290. Hand-written
    around the library for that reason; drop the first pass once #2066 is released.

    The first training finds which continuation tokens exist (the set does not depend on the
    order). The second registers them up front in text order, with the special tokens, so no id
    depends on the hash order; they are ordinary vocabulary again afterwards."""
    tok, trainer = build_untrained(spec)
    tok.train_from_iterator(texts(), trainer, length=rows)
    prefix = "##"  # models.WordPiece's continuing_subword_prefix, as build_untrained leaves it
    continuing = sorted(
        t for t in tok.get_vocab() if t.startswith(prefix) and len(t) == len(prefix) + 1
    )
    tok, trainer = build_untrained(spec, continuing)
    tok.train_from_iterator(texts(), trainer, length=rows)
    return canonical_wordpiece_ids(tok, unregister=set(continuing))


def canonical_wordpiece_ids(tok: Tokenizer, unregister: Collection[str] = ()) -> Tokenizer:
    """The same WordPiece vocabulary numbered the same way on every run.

    tokenizers' WordPiece trainer numbers its alphabet and merges in the iteration order of a
    Rust HashMap, which is seeded per process: the same recipe gave the same 4,000 tokens with
    134 of them at other ids (measured on SST-2), so a model pretrained on it started from a
    differently permuted embedding table and ended elsewhere (MLM perplexity 154 vs 269 on the
    same recipe and seed). WordPiece splits text by the vocabulary alone, never by id, so the ids
    are renumbered: special tokens first, in their trained order, then the rest sorted by text.

    ``unregister``: tokens trained as special tokens that are ordinary vocabulary (the
    continuation tokens ``train_wordpiece`` registers); they leave the added tokens first.
    """
    data = json.loads(tok.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] not in unregister]
    vocab: dict[str, int] = data["model"]["vocab"]
    special = sorted(
        (a["content"] for a in data["added_tokens"] if a["special"]), key=lambda t: vocab[t]
    )
    ordered = special + sorted(set(vocab) - set(special))
    data["model"]["vocab"] = {text: i for i, text in enumerate(ordered)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def _post_processor(tok: Tokenizer, target: str, roles: dict[str, str]) -> Any | None:
    """MLM: wrap inputs in cls/sep; seq2seq: end every input with eos (T5 style); clm: nothing
    (pretraining packs documents with EOS itself; finetuning decides per task)."""
    ids = {role: tok.token_to_id(text) for role, text in roles.items()}
    if target == "mlm":
        cls, sep = roles["cls"], roles["sep"]
        if cls == "<s>":  # RoBERTa style: two separators between segments, no segment ids
            pair = f"{cls} $A {sep} {sep} $B {sep}"
        else:  # BERT style: segment ids 0/1 (token_type_ids)
            pair = f"{cls} $A {sep} $B:1 {sep}:1"
        return processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=pair,
            special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])],
        )
    if target == "seq2seq":
        eos = roles["eos"]
        return processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, ids["eos"])]
        )
    return None


def _texts(ds: Any, column: str) -> Iterator[list[str]]:
    """Batches of the data's text. A generator runs where it is consumed (inside the tokenizers
    trainer): its error names its field itself rather than rely on a scope."""
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        values = batch[column]
        for value in values:
            if value is not None and not isinstance(value, str):
                raise UserError(
                    f"column {column!r} holds {type(value).__name__} values, not text", field="data"
                )
        yield [v for v in values if v]


def _wrap(tok: Tokenizer, spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    roles = special_tokens(spec.target, spec.algorithm)
    processor = _post_processor(tok, spec.target, roles)
    if processor is not None:
        tok.post_processor = processor
    kwargs: dict[str, Any] = {f"{role}_token": text for role, text in roles.items()}
    if spec.target == "mlm" and roles["cls"] == "[CLS]":
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _text_metrics(wrapped: Any, ds: Any, column: str) -> dict[str, float]:
    chars = tokens = unknown = 0
    unk_id = wrapped.unk_token_id
    sample = ds.select(range(min(len(ds), _METRIC_SAMPLE_ROWS)))
    for texts in _texts(sample, column):
        encoded = wrapped(texts, add_special_tokens=False)["input_ids"]
        chars += sum(len(t) for t in texts)
        tokens += sum(len(ids) for ids in encoded)
        if unk_id is not None:
            unknown += sum(ids.count(unk_id) for ids in encoded)
    if not tokens:
        return {}
    return {
        "chars_per_token": round(chars / tokens, 4),
        "tokens_per_char": round(tokens / chars, 4),
        "unk_rate": round(unknown / tokens, 6),
        "metric_rows": len(sample),
    }


@stage_entry
def run(spec: TokenizerSpec, ctx: StageContext) -> StageResult:
    """Train (or wrap) a tokenizer and save it to ``ctx.final_dir``.

    In a multi-process run rank 0 does the work and writes ``final/``; the other ranks wait and
    get its result (training the same tokenizer on every rank would only race on ``final/``).
    """
    from mlsteps.distributed import run_on_main

    return run_on_main(lambda: _run(spec, ctx))


def _training_text(spec: TokenizerSpec, ctx: StageContext) -> Any:
    """One text column made of every listed column of every data source, in order."""
    from mlsteps.engine.data import load_text

    ds = load_text(
        spec.data or [],
        spec.text_columns,
        data_field="data",
        column_field="text_column",
        cache_dir=ctx.cache_dir,
    )
    if spec.max_lines is not None and spec.max_lines < len(ds):
        ds = ds.select(range(spec.max_lines))
    return ds


def _run(spec: TokenizerSpec, ctx: StageContext) -> StageResult:
    from mlsteps.engine.checkpoints import write_dir_atomically
    from mlsteps.engine.data import TEXT_COLUMN

    ds = _training_text(spec, ctx) if spec.data else None
    if spec.from_ is not None:
        source = ctx.resolve_source(spec.from_)  # an unreachable hub is the stage's error
        from mlsteps.engine.modeling import load_tokenizer

        with field_scope("from"):
            wrapped = load_tokenizer(source)
        metrics: dict[str, Any] = {"vocab_size": len(wrapped), "source": spec.from_}
    else:
        assert ds is not None  # the spec requires 'data' when not 'from'
        minimum = spec.min_vocab_size()  # also refused by validation; kept for direct callers
        if spec.vocab_size < minimum:
            raise UserError(
                f"vocab_size {spec.vocab_size} is too small for {spec.algorithm}",
                field="vocab_size",
                hint=f"use at least {minimum}"
                + (" (256 byte tokens + specials)" if spec.algorithm == "bpe" else ""),
            )
        try:
            if spec.algorithm == "wordpiece":
                tok = train_wordpiece(spec, lambda: _texts(ds, TEXT_COLUMN), len(ds))
            else:
                tok, trainer = build_untrained(spec)
                tok.train_from_iterator(_texts(ds, TEXT_COLUMN), trainer, length=len(ds))
        except Exception as exc:  # the Rust trainers raise plain Exception
            if "not large enough" not in str(exc):
                raise
            raise UserError(
                f"vocab_size {spec.vocab_size} is smaller than the number of distinct characters "
                "in the text (Unigram keeps every character)",
                field="vocab_size",
                hint="raise vocab_size, or use algorithm bpe (byte-level) for text with many characters",
            ) from None
        if tok.get_vocab_size() <= len(_ROLES[spec.target]):
            raise UserError("the training text produced no vocabulary", field="data")
        wrapped = _wrap(tok, spec)
        metrics = {"vocab_size": len(wrapped), "requested_vocab_size": spec.vocab_size,
                   "algorithm": spec.algorithm, "training_rows": len(ds)}  # fmt: skip
        if len(wrapped) < spec.vocab_size:
            ctx.log(
                f"vocabulary has {len(wrapped)} tokens (asked for {spec.vocab_size}): the text is small"
            )
    if ds is not None:
        metrics.update(_text_metrics(wrapped, ds, TEXT_COLUMN))
    final = write_dir_atomically(ctx.final_dir, wrapped.save_pretrained)
    ctx.log(f"saved a {metrics['vocab_size']}-token tokenizer to {final}")
    return StageResult(metrics=metrics, outputs={"final": str(final)})
