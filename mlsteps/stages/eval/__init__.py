"""The `eval` stage: score one or several models on one data set (the stage ladder).

Everything that can be checked before work is checked first, in this order: the metric names,
each model's kind against each metric (reading configs only), the data's columns and their
value types. Then each model is loaded in turn and scored.

Metric families and the models they fit:

- ``perplexity`` (causal LM) on ``text_column``; also reports ``bits_per_byte``,
  ``word_perplexity``, ``perplexity_tokens`` and ``perplexity_convention``;
- ``response_perplexity`` (causal LM or seq2seq): ``reference_column`` given each model's own
  prompt, built from ``input_column`` exactly as for generation; also ``response_bits_per_byte``,
  ``response_word_perplexity``, ``response_perplexity_tokens`` and the convention;
- ``masked_perplexity`` / ``pseudo_perplexity`` (masked LM) on ``text_column``;
- ``bleu chrf ter rouge exact_match token_f1`` (causal LM or seq2seq): outputs generated from
  ``input_column`` (rendered by the prompter for a prompted model) against ``reference_column``;
- ``accuracy f1`` (macro-F1): a sequence-classification model, or a prompted model with a
  verbalizer (rank classification by the likelihood of each verbalizer word), on
  ``input_column`` against ``label_column``.

The names, families, fitting model kinds, directions and scales come from the metric table
(metrics/table.py); scoring.py scores one loaded model family by family.

Generated text and predicted labels go to ``predictions.jsonl``: one line per model and row,
models in the order listed, rows in input order, each with a ``model`` field.
"""

from __future__ import annotations

import gc
from typing import Any

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.engine.rows import (
    column_values,
    require_inputs,
    require_text,
    write_jsonl,
)
from mlsteps.errors import HERE, UserError, did_you_mean, field_scope

# The metric families and the model kinds they fit live with the recipe models: `validate`
# checks them too, without importing this module.
from mlsteps.recipe.specs.evaluate import (
    FITS,
    GENERATION,
    LABELS,
    MASKED,
    METRICS,
    PERPLEXITY,
    RESPONSE,
    EvalSpec,
)
from mlsteps.stages.eval.scoring import score_model

_KIND_NAMES = {
    "clm": "a causal LM",
    "seq2seq": "a seq2seq model",
    "mlm": "a masked LM",
    "classification": "a sequence classifier",
}


def _check_metric_names(metrics: list[str]) -> list[str]:
    for i, name in enumerate(metrics):
        if name not in METRICS:
            hint = did_you_mean(name, METRICS) or f"choose from {', '.join(METRICS)}"
            raise UserError(f"unknown metric '{name}' at metrics.{i}", field="metrics", hint=hint)
    return list(dict.fromkeys(metrics))


def _fitting(info: Any) -> frozenset[str]:
    fits = FITS[info.kind]
    if info.prompter is not None and getattr(info.prompter, "verbalizer", None):
        fits = fits | LABELS  # rank classification over the verbalizer words
    return fits


def _check_fit(label: str, info: Any, metrics: list[str]) -> None:
    fits = _fitting(info)
    for metric in metrics:
        if metric not in fits:
            usable = ", ".join(m for m in METRICS if m in fits)
            raise UserError(
                f"metric '{metric}' does not fit model '{label}', {_KIND_NAMES[info.kind]}",
                field="metrics",
                hint=f"metrics for this model: {usable}; or drop the model from 'models'",
            )


def _check_lengths(spec: EvalSpec, label: str, info: Any, metrics: list[str]) -> None:
    """Windows and generation lengths that cannot fit the model fail before any work."""
    from mlsteps.metrics.perplexity import config_max_positions

    limit = config_max_positions(info.config)
    if limit is None:
        return
    window = spec.perplexity.window
    if window is not None and window > limit and set(metrics) & (PERPLEXITY | MASKED | RESPONSE):
        raise UserError(
            f"perplexity.window {window} exceeds the {limit} positions of model '{label}'",
            field="perplexity.window",
            hint=f"set perplexity.window <= {limit}",
        )
    if info.kind == "clm" and set(metrics) & GENERATION and spec.generation.max_new_tokens >= limit:
        raise UserError(
            f"generation.max_new_tokens {spec.generation.max_new_tokens} leaves no room for a "
            f"prompt in the {limit} positions of model '{label}'",
            field="generation.max_new_tokens",
            hint=f"set generation.max_new_tokens < {limit}",
        )


def _require_references(rows: Any, column: str | list[str]) -> list[str | list[str]]:
    """References per row: one column (a string or a list of strings per row; a conversation:
    the text of its final assistant turn), or several columns joined into one list per row, in
    column order (null cells skipped: rows may have fewer references)."""
    from mlsteps.engine.chat_data import reference_of
    from mlsteps.metrics.classification import as_reference_lists

    if isinstance(column, str):
        values = [reference_of(v) for v in column_values(rows, column)]
        as_reference_lists(values, name=f"column '{column}'")  # type check only
        return values
    joined: list[list[Any]] = [[] for _ in range(rows.num_rows)]
    for name in column:
        for refs, value in zip(joined, column_values(rows, name), strict=True):
            refs.extend(value if isinstance(value, list) else [] if value is None else [value])
    names = ", ".join(f"'{c}'" for c in column)
    as_reference_lists(joined, name=f"columns {names}")
    return [refs for refs in joined]


def _require_labels(rows: Any, column: str) -> list[Any]:
    values = column_values(rows, column)
    for i, value in enumerate(values):
        if isinstance(value, list | dict) or value is None:
            raise UserError(
                f"column '{column}' row {i} is {type(value).__name__}, expected a single label",
                field=HERE,
                hint="set label_column to a column of class labels",
            )
    return values


def majority_baseline(gold: list[Any], metrics: list[str]) -> dict[str, Any]:
    """The ladder row of always predicting the most frequent label *of the eval data* (ties: the
    smallest label as text): the floor any classifier in the ladder has to beat."""
    from collections import Counter

    from mlsteps.metrics import classification

    counts = Counter(str(g) for g in gold)
    top = max(sorted(counts), key=counts.__getitem__)
    predicted = [top] * len(gold)
    row: dict[str, Any] = {}
    if "accuracy" in metrics:
        row["accuracy"] = classification.accuracy(predicted, gold)
    if "f1" in metrics:
        row["f1"] = classification.macro_f1(predicted, gold)
    row["majority_label"] = top
    return row


def _needed(spec: EvalSpec, metrics: list[str], infos: dict[str, Any]) -> list[str]:
    """Columns every row must have a value in (a null is reported by its file line)."""
    needed = [spec.text_column] if set(metrics) & (PERPLEXITY | MASKED) else []
    prompted = all(i.prompter for i in infos.values())
    if set(metrics) & (GENERATION | LABELS | RESPONSE) and not prompted:
        needed.append(spec.input_column)
    if set(metrics) & (GENERATION | RESPONSE):
        # Several reference columns: an empty cell is skipped per row, so none is required.
        if isinstance(spec.reference_column, str):
            needed.append(spec.reference_column)
    if set(metrics) & LABELS:
        needed.append(spec.label_column)
    return needed


def _load_data(
    spec: EvalSpec,
    ctx: StageContext,
    metrics: list[str],
    infos: dict[str, Any],
    data: dict[str, Any],
) -> Any:
    """The eval rows, every column the metrics read checked, their values put into ``data``
    (its errors are about the data field: the caller scopes them)."""
    from mlsteps.engine.data import load_rows, require_columns

    assert spec.data is not None  # EvalSpec: metrics need data
    rows = load_rows(spec.data, cache_dir=ctx.cache_dir, required=_needed(spec, metrics, infos))
    if set(metrics) & (PERPLEXITY | MASKED):
        require_columns(rows, [spec.text_column])
        data["text"] = require_text(rows, spec.text_column, "text_column")
    prompted = all(i.prompter is not None for i in infos.values())
    if set(metrics) & (GENERATION | LABELS | RESPONSE) and not prompted:
        require_columns(rows, [spec.input_column])
        require_inputs(rows, spec.input_column)
    if set(metrics) & (GENERATION | RESPONSE):
        ref_columns = spec.reference_column
        require_columns(rows, [ref_columns] if isinstance(ref_columns, str) else ref_columns)
        data["references"] = _require_references(rows, spec.reference_column)
    if set(metrics) & LABELS:
        require_columns(rows, [spec.label_column])
        data["labels"] = _require_labels(rows, spec.label_column)
    if "preference_accuracy" in metrics:
        from mlsteps.metrics.preference import pairs_from_rows

        columns = (spec.prompt_column, spec.chosen_column, spec.rejected_column)
        data["pairs"] = pairs_from_rows(rows, *columns)
    if set(metrics) & (GENERATION | LABELS | RESPONSE):
        # These render prompts; perplexity scores text_column as is, prompted model or not.
        for info in infos.values():
            if info.prompter is not None:
                info.prompter.check_columns(rows.column_names, field=HERE)
    return rows


@stage_entry
def run(spec: EvalSpec, ctx: StageContext) -> StageResult:
    """Evaluate every model of ``spec.models`` on ``spec.data`` and on ``spec.lm_eval``'s tasks:
    ``{model: {metric: value}}``."""
    from mlsteps.engine.inference import inspect_source, load_for_inference
    from mlsteps.engine.modeling import loading_kwargs

    metrics = _check_metric_names(spec.metrics)
    if len(set(spec.models)) != len(spec.models):
        raise UserError("a model is listed twice", field="models")
    infos = {}
    for index, label in enumerate(spec.models):
        source = ctx.resolve_source(label)  # an unreachable hub is the stage's error
        with field_scope(f"models.{index}"):
            info = inspect_source(source, trust_remote_code=spec.trust_remote_code)
        _check_fit(label, info, metrics)
        _check_lengths(spec, label, info, metrics)
        infos[label] = info

    manager = None
    if spec.lm_eval is not None:
        from mlsteps.engine import harness

        harness.check_models(infos)
        manager = harness.task_manager(spec.lm_eval)  # unknown task names fail here
    data: dict[str, Any] = {}
    with field_scope("data"):
        rows = _load_data(spec, ctx, metrics, infos, data) if metrics else None

    ladder: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    reuse: dict[str, list[list[float]]] = {}  # label scores shared by calibrations of one model
    for index, label in enumerate(spec.models):
        ladder[label] = {}
        if rows is not None:
            ctx.log(f"evaluating {label} ({infos[label].kind}) on {rows.num_rows} rows")
            loaded = load_for_inference(
                infos[label].source,
                trust_remote_code=spec.trust_remote_code,
                model_field=f"models.{index}",
                loading=loading_kwargs(spec),
            )
            scores, model_records = score_model(spec, ctx, loaded, rows, metrics, data, reuse)
            ladder[label] = scores
            records += [{"model": label, **rec} for rec in model_records]
            del loaded
            gc.collect()  # one model in memory at a time
        if spec.lm_eval is not None:
            ctx.log(f"lm-eval tasks {', '.join(spec.lm_eval.tasks)} on {label}")
            with field_scope(f"models.{index}"):
                lm_scores = harness.evaluate(
                    spec.lm_eval, infos[label], manager, trust_remote_code=spec.trust_remote_code
                )
            ladder[label].update(lm_scores)
            gc.collect()
    if set(metrics) & LABELS and "majority_baseline" not in ladder:
        ladder["majority_baseline"] = majority_baseline(data["labels"], metrics)
    outputs: dict[str, str] = {}
    if records:
        write_jsonl(ctx.predictions_path, records)
        outputs["predictions"] = str(ctx.predictions_path)
    return StageResult(metrics=ladder, outputs=outputs)
