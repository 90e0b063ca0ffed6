"""Recipe model of the `tokenizer` stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import Bool, PositiveInt, Strict, Unused
from mlsteps.recipe.specs.data import DataSources, column_list

# Special-token roles per target, in id order (pad first: id 0 is what T5 and BERT expect).
SPECIAL_ROLES = {
    "clm": ("pad", "unk", "bos", "eos"),
    "mlm": ("pad", "unk", "cls", "sep", "mask"),
    "seq2seq": ("pad", "eos", "unk", "bos"),
}


class TokenizerSpec(Strict):
    """Train a tokenizer with the `tokenizers` library, or wrap an existing one."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("from_",)

    kind: Literal["tokenizer"] = Field(..., description="Stage kind.")
    from_: str | None = Field(
        None,
        alias="from",
        description="Wrap an existing tokenizer (earlier stage, local directory or hub id) "
        "instead of training one.",
    )
    data: DataSources | None = Field(
        None,
        description="Text to train on (required unless 'from'): one data source, or a list of "
        "sources (e.g. [builtin:toy/corpus, {builtin: toy/translate}]) trained on together.",
    )
    text_column: str | list[str] = Field(
        "text",
        description="Column(s) holding the text; with a list, every listed column a source has "
        "is used (e.g. [text, source, target]).",
    )
    algorithm: Literal["bpe", "wordpiece", "unigram"] = Field(
        "bpe",
        description="bpe: byte-level BPE (GPT-2 style); wordpiece: BERT style; unigram: "
        "SentencePiece style.",
    )
    vocab_size: PositiveInt = Field(8000, description="Target vocabulary size.")
    min_frequency: PositiveInt = Field(2, description="Minimum pair/token frequency to merge.")
    lowercase: Bool = Field(False, description="Lowercase text before tokenizing.")
    normalization: Literal["none", "nfc", "nfkc"] = Field(
        "nfc",
        description="Unicode normalisation applied before tokenizing (nfkc also folds full-width "
        "punctuation such as ，。 into ASCII, which changes Chinese output).",
    )
    target: Literal["clm", "mlm", "seq2seq"] = Field(
        "clm",
        description="Model family the tokenizer serves; picks the special tokens "
        "(clm: bos/eos/pad/unk; mlm: cls/sep/mask/pad/unk; seq2seq: pad/eos/unk/bos).",
    )
    max_lines: PositiveInt | None = Field(None, description="Train on at most N lines/rows.")

    @property
    def text_columns(self) -> list[str]:
        """``text_column`` as a list."""
        return column_list(self.text_column)

    def min_vocab_size(self) -> int:
        """The smallest vocabulary the trainer can build: the special tokens, plus the 256 byte
        tokens of byte-level BPE (plus two for the other algorithms' alphabets)."""
        specials = len(SPECIAL_ROLES[self.target])
        return 256 + specials if self.algorithm == "bpe" else specials + 2

    def _invalid(self) -> list[Unused]:
        if self.from_ is not None or self.vocab_size >= self.min_vocab_size():
            return []
        why = " (256 byte tokens + specials)" if self.algorithm == "bpe" else ""
        return [
            (
                "vocab_size",
                f"vocab_size {self.vocab_size} is too small for {self.algorithm}",
                f"use at least {self.min_vocab_size()}{why}",
            )
        ]

    def _ignored(self) -> list[Unused]:
        if self.from_ is None:
            return []
        out = self._unused(
            ("algorithm", "vocab_size", "min_frequency", "lowercase", "normalization", "target"),
            "'from' wraps an existing tokenizer; nothing is trained",
            "remove it, or remove 'from' to train a tokenizer",
        )
        if self.data is None:  # with 'from', data only measures the tokenizer on some text
            out += self._unused(("text_column", "max_lines"), "there is no 'data'")
        return out

    @model_validator(mode="after")
    def _data_or_from(self) -> TokenizerSpec:
        if self.from_ is None and self.data is None:
            raise ValueError("give 'data' to train a tokenizer, or 'from' to wrap an existing one")
        return self
