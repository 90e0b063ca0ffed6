"""Fine-tuning data: column checks, label maps, prompt templates, tokenisation for classification and
seq2seq, truncation counts (causal SFT batches, packing and collator: ``sft.py``).

Everything here runs before training starts, so bad data is reported as a UserError before the
stage writes anything. Tokenised datasets keep only model inputs (``input_ids``,
``attention_mask``, ``labels``, ``position_ids`` for packed SFT) so the Trainer never has to guess.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import datasets

from mlsteps.errors import HERE, UserError
from mlsteps.recipe.specs.finetune import FinetuneSpec, template_fields
from mlsteps.templates import Renderer, TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the transformers losses skip


@functools.lru_cache(maxsize=8)
def _renderer(template: str, template_format: str) -> Renderer:
    return Renderer(template, template_format)  # one compile per template, not per row


def render_template(template: str, values: dict[str, Any], template_format: str = "auto") -> str:
    """The one renderer of mlsteps/templates.py (also eval/predict's, via mlsteps_prompt.json)."""
    try:
        return _renderer(template, template_format).render(values)
    except TemplateError as exc:
        raise UserError(str(exc), field=HERE, hint=exc.hint) from None


def required_columns(spec: FinetuneSpec) -> list[str]:
    """Columns the task reads from every training/validation row."""
    if spec.task == "classification":
        cols = [spec.text_column, spec.label_column]
        return cols + ([spec.text_pair_column] if spec.text_pair_column else [])
    if spec.task == "seq2seq":
        return [spec.source_column, spec.target_column]
    if spec.task == "chat":
        return [spec.messages_column]
    prompt_cols = (
        template_fields(spec.template, spec.template_format)
        if spec.template
        else [spec.prompt_column]
    )
    return prompt_cols + [c for c in [spec.response_column] if c not in prompt_cols]


def check_not_empty(ds: datasets.Dataset, *, name: str) -> None:
    if len(ds) == 0:
        raise UserError(
            f"the {name} split has no rows", field=HERE, hint="check the files and max_samples"
        )


def as_text(value: Any, *, column: str, row: int, first_of_list: bool = False) -> str:
    """A cell as text. Lists of strings (scitldr style) are joined, or their first item taken."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0] if first_of_list else " ".join(v.strip() for v in value)
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, list):
        raise UserError(
            f"column '{column}' is empty in row {row}",
            field=HERE,
            hint="drop rows without a value or fill them in",
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise UserError(
        f"column '{column}' row {row} is a {type(value).__name__}, expected text", field=HERE
    )


# ---------------------------------------------------------------- classification labels


def label_mapping(
    train_labels: Sequence[Hashable], validation_labels: Sequence[Hashable]
) -> dict[str, int]:
    """Map every training label to a class id: ints in numeric order, strings sorted.

    Keys are the labels as strings (config.label2id needs string keys); int labels 0..K-1 keep
    their own value as id. A validation label that training never saw is a UserError.
    """
    for i, value in enumerate(train_labels):
        if value is None or isinstance(value, list | dict | float):
            raise UserError(
                f"label row {i} is {value!r}; labels must be integers or strings",
                field=HERE,
                hint="fill in missing labels, or convert float labels to ints",
            )
    distinct = set(train_labels)
    if all(isinstance(v, int) for v in distinct):
        ordered = [str(v) for v in sorted(distinct)]  # type: ignore[type-var]
    else:
        ordered = sorted(str(v) for v in distinct)
    if len(ordered) < 2:
        raise UserError(
            f"training data has a single label ({ordered[0] if ordered else 'none'})",
            field=HERE,
            hint="classification needs at least two classes",
        )
    label2id = {label: i for i, label in enumerate(ordered)}
    unseen = sorted({str(v) for v in validation_labels} - set(label2id))
    if unseen:
        raise UserError(
            f"validation labels never seen in training: {', '.join(unseen[:10])}",
            field=HERE,
            hint=f"training labels are {', '.join(ordered[:20])}; fix the label column or the split",
        )
    return label2id


def inverse_frequency_weights(label_ids: Sequence[int], num_labels: int) -> list[float]:
    """Class weights n / (K * count_k): mean weight over the training rows is 1."""
    counts = Counter(label_ids)
    total = len(label_ids)
    return [total / (num_labels * counts[k]) if counts[k] else 0.0 for k in range(num_labels)]


def tokenize_classification(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    spec: FinetuneSpec,
    label2id: dict[str, int],
) -> datasets.Dataset:
    """input_ids/attention_mask (truncated to max_seq_len) + integer ``labels``."""
    text_col, pair_col, label_col = spec.text_column, spec.text_pair_column, spec.label_column

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        texts = [
            as_text(v, column=text_col, row=i)
            for v, i in zip(batch[text_col], indices, strict=True)
        ]
        pairs = (
            [
                as_text(v, column=pair_col, row=i)
                for v, i in zip(batch[pair_col], indices, strict=True)
            ]
            if pair_col
            else None
        )
        full = tokenizer(texts, pairs)["input_ids"]
        enc = tokenizer(texts, pairs, truncation=True, max_length=spec.max_seq_len)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [label2id[str(v)] for v in batch[label_col]],
            TRUNCATED: [len(ids) > spec.max_seq_len for ids in full],
        }

    return encode_rows(ds, encode)


# Column the tokenisers add for each row: did max_seq_len / max_source_len / max_target_len cut
# it? pop_truncated removes it before training, so datasets hold only model inputs.
TRUNCATED = "truncated"


def pop_truncated(ds: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """(the dataset without the truncation flags, how many of its rows were truncated)."""
    if TRUNCATED not in ds.column_names:
        return ds, 0
    return ds.remove_columns(TRUNCATED), int(sum(ds[TRUNCATED]))


def truncation_metrics(
    spec: FinetuneSpec,
    truncated: tuple[int, int],
    n_train: int,
    *,
    validation: bool,
    log: Any,
) -> dict[str, Any]:
    """``train_truncated_examples``/``_share`` (and ``val_truncated_examples``): how many examples
    the length limits cut, logged when any were. A model trained on cut sources or answers
    learns less than the settings suggest, and nothing else would tell."""
    limits = (
        f"max_source_len={spec.max_source_len}/max_target_len={spec.max_target_len}"
        if spec.task == "seq2seq"
        else f"max_seq_len={spec.max_seq_len}"
    )
    n_cut, n_val_cut = truncated
    share = n_cut / n_train if n_train else 0.0
    out: dict[str, Any] = {"train_truncated_examples": n_cut, "train_truncated_share": share}
    if validation:
        out["val_truncated_examples"] = n_val_cut
    if n_cut or n_val_cut:
        log(
            f"{limits} cut {n_cut} of {n_train} training examples ({share:.1%})"
            + (f" and {n_val_cut} validation examples" if n_val_cut else "")
        )
    return out


def encode_rows(ds: datasets.Dataset, encode: Any) -> datasets.Dataset:
    """``encode(batch, indices)`` over ``ds`` in batches, replacing its columns."""
    return ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        # In memory: no cache files keyed by an unhashable closure piling up in the run cache.
        keep_in_memory=True,
    )


# ---------------------------------------------------------------- seq2seq


def _ensure_eos(ids: list[int], eos_id: int | None, max_len: int) -> list[int]:
    """Targets must end in EOS so that the model learns to stop (tokenizers without a
    post-processor do not add it); truncation keeps the EOS."""
    if eos_id is None:
        return ids[:max_len]
    if not ids or ids[-1] != eos_id:
        ids = ids[: max_len - 1] + [eos_id]
    return ids[:max_len]


def seq2seq_source(value: Any, spec: FinetuneSpec, *, row: int) -> str:
    return spec.source_prefix + as_text(value, column=spec.source_column, row=row)


def tokenize_seq2seq(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, spec: FinetuneSpec
) -> datasets.Dataset:
    """Source (with source_prefix) truncated to max_source_len; target to max_target_len + EOS.

    A list of targets (several references) trains on the first one.
    """
    eos_id = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        sources = [
            seq2seq_source(v, spec, row=i)
            for v, i in zip(batch[spec.source_column], indices, strict=True)
        ]
        targets = [
            as_text(v, column=spec.target_column, row=i, first_of_list=True)
            for v, i in zip(batch[spec.target_column], indices, strict=True)
        ]
        full_src = tokenizer(sources)["input_ids"]
        full_tgt = tokenizer(text_target=targets)["input_ids"]
        enc = tokenizer(sources, truncation=True, max_length=spec.max_source_len)
        tgt = tokenizer(text_target=targets, truncation=True, max_length=spec.max_target_len)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [_ensure_eos(ids, eos_id, spec.max_target_len) for ids in tgt["input_ids"]],
            TRUNCATED: [
                len(s) > spec.max_source_len
                or len(_ensure_eos(t, eos_id, len(t) + 1)) > spec.max_target_len
                for s, t in zip(full_src, full_tgt, strict=True)
            ],
        }

    return encode_rows(ds, encode)


# ---------------------------------------------------------------- causal LM (SFT)


def special_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before the text (e.g. llama's BOS); [] for gpt2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def sft_prompt(row: dict[str, Any], spec: FinetuneSpec, *, index: int) -> str:
    """The prompt text of one row: the template filled from the row, or the prompt column."""
    if spec.template is None:
        return as_text(row[spec.prompt_column], column=spec.prompt_column, row=index)
    fields = template_fields(spec.template, spec.template_format)
    if _renderer(spec.template, spec.template_format).fmt == "jinja":
        values = {name: row[name] for name in fields}  # Jinja sees the cells as they are
    else:
        values = {name: as_text(row[name], column=name, row=index) for name in fields}
    return render_template(spec.template, values, spec.template_format)


def split_trailing_spaces(prompt: str) -> tuple[str, str]:
    """(prompt without trailing spaces, those spaces). The spaces belong to the response side:
    BPE tokenizers glue a leading space to the next word ("Ġgreat"), so a prompt ending in a
    bare space would teach a token split the model never saw in pretraining. Generation is
    then prompted with the stripped text (see prompt/prompter.py for the same convention)."""
    stripped = prompt.rstrip(" ")
    return stripped, prompt[len(stripped) :]
