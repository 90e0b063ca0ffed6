"""Fine-tuning data for one run: rows and validation sets loaded and checked, the label map, and
per task the tokenised datasets, collator, metrics hook and generation samples (``Prepared``).

Everything here runs before training starts: bad data is a UserError before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
from transformers import DataCollatorWithPadding

from mlsteps.context import StageContext
from mlsteps.engine import validation_sets as vs
from mlsteps.engine.data import load_rows, require_columns, split_validation
from mlsteps.errors import field_scope
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages.finetune import chat
from mlsteps.stages.finetune import data as fd
from mlsteps.stages.finetune import evaluation as fe
from mlsteps.stages.finetune import sft as fs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Prepared:
    """Tokenised data and task-specific hooks for one run."""

    train: datasets.Dataset
    # Validation sets by name ('' for the one unnamed set; empty without validation).
    validation: dict[str, datasets.Dataset]
    collator: Any = None
    compute_metrics: Callable[..., dict[str, float]] | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    # Per validation set: generation inputs and their references.
    gen: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)
    label2id: dict[str, int] | None = None
    # Examples cut by max_seq_len / max_source_len / max_target_len: (training, validation).
    truncated: tuple[int, int] = (0, 0)

    def pop_truncated(self) -> None:
        """Move the tokenisers' per-row truncation flags out of the datasets into counts."""
        self.train, n_train = fd.pop_truncated(self.train)
        n_val = 0
        for name, ds in self.validation.items():
            self.validation[name], n_cut = fd.pop_truncated(ds)
            n_val += n_cut
        self.truncated = (n_train, n_val)


def load_sets(
    spec: FinetuneSpec, ctx: StageContext
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset], bool]:
    """Training rows, the validation sets by name ('' unnamed) and whether they were given."""
    columns = fd.required_columns(spec)
    with field_scope("data"):
        rows = load_rows(spec.data, cache_dir=ctx.cache_dir, required=columns)
        require_columns(rows, columns)
    if spec.validation is not None:

        def load(name: str, data: Any) -> datasets.Dataset:
            with field_scope(_val_field(name)):
                val = load_rows(data, cache_dir=ctx.cache_dir, required=columns)
                require_columns(val, columns)
                fd.check_not_empty(val, name="validation")
            return val

        return rows, vs.map_sets(vs.data_sets(spec.validation), load), True
    with field_scope("validation_fraction"):
        train_rows, val_rows = split_validation(rows, spec.validation_fraction, ctx.seed)
    with field_scope("data"):
        fd.check_not_empty(train_rows, name="training")
    return train_rows, ({"": val_rows} if val_rows is not None else {}), False


def labels(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    explicit_val: bool,
    ctx: StageContext,
) -> tuple[dict[str, datasets.Dataset], dict[str, int]]:
    """The label map (checked against every validation set) and the validation sets to use."""
    label_col = spec.label_column
    if explicit_val:
        with field_scope("data"):
            label2id = fd.label_mapping(train_rows[label_col], [])
        for name, rows in val_sets.items():  # each set checked at its own place
            with field_scope(_val_field(name)):
                fd.label_mapping(train_rows[label_col], rows[label_col])
        return val_sets, label2id
    val_rows = val_sets.get("")
    if val_rows is not None:
        # A random hold-out can catch the only rows of a rare class: drop those rows rather
        # than fail on a split the user did not choose.
        seen = {str(v) for v in train_rows[label_col]}
        kept = val_rows.filter(lambda r: str(r[label_col]) in seen, keep_in_memory=True)
        if len(kept) < len(val_rows):
            ctx.log(
                f"dropped {len(val_rows) - len(kept)} validation rows with labels unseen in training"
            )
        val_rows = kept if len(kept) else None
    val_labels = val_rows[label_col] if val_rows is not None else []
    with field_scope("data"):
        label2id = fd.label_mapping(train_rows[label_col], val_labels)
    return ({"": val_rows} if val_rows is not None else {}), label2id


def prepare(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    explicit_val: bool,
    tokenizer: PreTrainedTokenizerBase,
    label2id: dict[str, int] | None,
) -> Prepared:
    """Tokenised training and validation data, with the task's collator and validation hooks."""
    if label2id is not None:
        return _prepare_classification(
            spec, train_rows, val_sets, explicit_val, tokenizer, label2id
        )
    if spec.task == "seq2seq":
        return _prepare_seq2seq(spec, train_rows, val_sets, tokenizer)
    if spec.task == "chat":
        return _prepare_chat(spec, train_rows, val_sets, tokenizer)
    return _prepare_sft(spec, train_rows, val_sets, tokenizer)


def _val_field(name: str, explicit_val: bool = True) -> str:
    """The field rows of validation set ``name`` come from (a held-out part of 'data' if not
    given), relative to the stage."""
    return vs.where_of("validation", name) if explicit_val else "data"


def _prepare_classification(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    explicit_val: bool,
    tokenizer: PreTrainedTokenizerBase,
    label2id: dict[str, int],
) -> Prepared:
    with field_scope("data"):
        train_ds = fd.tokenize_classification(train_rows, tokenizer, spec, label2id)

    def tokenize(name: str, rows: datasets.Dataset) -> datasets.Dataset:
        with field_scope(_val_field(name, explicit_val)):
            return fd.tokenize_classification(rows, tokenizer, spec, label2id)

    val_ds = vs.map_sets(val_sets, tokenize)
    prep = Prepared(train_ds, val_ds, DataCollatorWithPadding(tokenizer), label2id=label2id)
    prep.pop_truncated()
    prep.compute_metrics = fe.classification_metrics()
    if spec.class_weights:
        weights = fd.inverse_frequency_weights(train_ds["labels"], len(label2id))
        prep.trainer_kwargs["compute_loss_func"] = fe.weighted_loss(weights)
    return prep


def _prepare_seq2seq(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
) -> Prepared:
    with field_scope("data"):
        train_ds = fd.tokenize_seq2seq(train_rows, tokenizer, spec)

    def tokenize(name: str, rows: datasets.Dataset) -> datasets.Dataset:
        with field_scope(_val_field(name)):
            return fd.tokenize_seq2seq(rows, tokenizer, spec)

    val_ds = vs.map_sets(val_sets, tokenize)
    prep = Prepared(train_ds, val_ds)
    prep.pop_truncated()
    for name, rows in val_sets.items():
        sample = _sample(rows, spec)
        inputs = [
            fd.seq2seq_source(v, spec, row=i) for i, v in enumerate(sample[spec.source_column])
        ]
        refs = fe.references(sample[spec.target_column], spec.target_column)
        prep.gen[name] = (inputs, refs)
    return prep


def _prepare_sft(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
) -> Prepared:
    with field_scope("data"):
        train_ds = fs.tokenize_sft(train_rows, tokenizer, spec)

    def tokenize(name: str, rows: datasets.Dataset) -> datasets.Dataset:
        with field_scope(_val_field(name)):
            return fs.tokenize_sft(rows, tokenizer, spec)

    val_ds = vs.map_sets({n: rows for n, rows in val_sets.items() if len(rows)}, tokenize)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    prep = Prepared(train_ds, val_ds, fs.SftCollator(pad_token_id=int(pad_id)))
    prep.pop_truncated()
    if spec.packing:
        prep.train = fs.pack_sft(prep.train, spec.max_seq_len)
        prep.validation = vs.map_sets(
            prep.validation, lambda _, ds: fs.pack_sft(ds, spec.max_seq_len)
        )
    for name, val_rows in val_sets.items():
        sample = _sample(val_rows, spec)
        rows = sample.to_list()
        inputs = [
            fd.split_trailing_spaces(fd.sft_prompt(r, spec, index=i))[0] for i, r in enumerate(rows)
        ]
        refs = fe.references(sample[spec.response_column], spec.response_column)
        prep.gen[name] = (inputs, refs)
    return prep


def _prepare_chat(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
) -> Prepared:
    col, n = spec.messages_column, spec.max_seq_len
    with field_scope("data"):
        train_ds = chat.tokenize_chat(train_rows, tokenizer, col, n)

    def tokenize(name: str, rows: datasets.Dataset) -> datasets.Dataset:
        with field_scope(_val_field(name)):
            return chat.tokenize_chat(rows, tokenizer, col, n)

    val_ds = vs.map_sets(val_sets, tokenize)
    if spec.packing:
        train_ds = fs.pack_sft(train_ds, n)
        val_ds = vs.map_sets(val_ds, lambda _, ds: fs.pack_sft(ds, n))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    prep = Prepared(train_ds, val_ds, fs.SftCollator(pad_token_id=int(pad_id)))
    for name, rows in val_sets.items():
        with field_scope(_val_field(name)):
            prep.gen[name] = chat.generation_pairs(_sample(rows, spec), tokenizer, col)
    return prep


def _sample(rows: datasets.Dataset, spec: FinetuneSpec) -> datasets.Dataset:
    limit = spec.validation_max_samples
    return rows.select(range(min(limit, len(rows)))) if limit else rows
