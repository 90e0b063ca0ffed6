"""The `predict` stage: batched generation (or classification) for every row, in input order.

For a causal LM or seq2seq model each line of ``predictions.jsonl`` holds ``index``, ``input``
(the input column; for a prompted model without that column, the rendered prompt),
``prediction`` and, when ``reference_column`` is set, ``reference``. For a sequence classifier
(full model or LoRA adapter) it holds ``index``, ``input``, ``label`` (the arg-max label),
``probabilities`` (``{label: softmax probability}`` over every label) and ``reference``.
"""

from __future__ import annotations

from typing import Any

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.distributed import map_sharded
from mlsteps.engine.rows import (
    generate_for,
    render_inputs,
    require_inputs,
    require_text,
    write_jsonl,
)
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.evaluate import PredictSpec
from mlsteps.stage_kinds import PREDICTABLE  # the model kinds predict uses; validate checks them


@stage_entry
def run(spec: PredictSpec, ctx: StageContext) -> StageResult:
    """Generate an output (a classifier: a label and its probabilities) for every row of
    ``spec.data`` with ``spec.model``."""
    from mlsteps.engine.chat_data import reference_of
    from mlsteps.engine.data import load_rows, require_columns
    from mlsteps.engine.inference import load_for_inference
    from mlsteps.engine.modeling import loaded_metrics, loading_kwargs

    info = _predicting_model(spec, ctx)
    # A null input is reported by its file line (a prompted model renders its own columns).
    needed = [spec.input_column] if info.prompter is None else []
    with field_scope("data"):
        rows = load_rows(spec.data, cache_dir=ctx.cache_dir, required=needed)
    if info.kind == "classification":
        return _classify(spec, ctx, info, rows)
    prompter = info.prompter
    column: list[str] | None = None
    with field_scope("data"):
        if prompter is None or spec.input_column in rows.column_names:
            require_columns(rows, [spec.input_column])
            column = require_inputs(rows, spec.input_column)
        if spec.reference_column is not None:
            require_columns(rows, [spec.reference_column])
        if prompter is not None:
            prompter.check_columns(rows.column_names, field=HERE)

    loaded = load_for_inference(
        info.source,
        trust_remote_code=spec.trust_remote_code,
        model_field="model",
        loading=loading_kwargs(spec),
    )
    with field_scope("data"):
        if prompter is not None:  # rendered with the loaded prompter: it has the chat template
            prompter = loaded.prompter
            assert prompter is not None
            inputs = [prompter.render(row, field=HERE) for row in rows]
        else:  # conversations go through the model's chat template
            assert column is not None
            inputs = render_inputs(loaded, column, spec.input_column)
    shown = column if column is not None else inputs
    ctx.log(f"generating {len(inputs)} outputs with {spec.model}")
    # Each rank generates a disjoint shard; every rank gets all outputs back in input order.
    preds = map_sharded(lambda xs: generate_for(loaded, xs, spec.generation, ctx), inputs)
    post = getattr(prompter, "postprocess", None)
    if post is not None:
        preds = [post(p) for p in preds]
    refs: list[Any] | None = (
        [reference_of(v) for v in rows[spec.reference_column]]
        if spec.reference_column is not None
        else None
    )
    records = _records(shown, preds, refs)
    write_jsonl(ctx.predictions_path, records)
    return StageResult(
        metrics={"predictions": len(records), **loaded_metrics(loaded.model, spec)},
        outputs={"predictions": str(ctx.predictions_path)},
    )


def _predicting_model(spec: PredictSpec, ctx: StageContext) -> Any:
    """What ``spec.model`` is (configs only); a kind that neither generates nor classifies is
    a UserError."""
    from mlsteps.engine.inference import inspect_source

    source = ctx.resolve_source(spec.model)  # an unreachable hub is the stage's error
    with field_scope("model"):
        info = inspect_source(source, trust_remote_code=spec.trust_remote_code)
    if info.kind not in PREDICTABLE:
        raise UserError(
            f"model '{spec.model}' is a {info.kind} model: it neither generates text nor "
            "predicts labels",
            field="model",
            hint="predict needs a causal LM, a seq2seq model or a sequence classifier",
        )
    return info


def _records(shown: list[Any], preds: list[Any], refs: list[Any] | None) -> list[dict[str, Any]]:
    """predictions.jsonl's rows: index, input as the data has it, prediction, reference."""
    records = []
    for i, (shown_input, pred) in enumerate(zip(shown, preds, strict=True)):
        rec: dict[str, Any] = {"index": i, "input": shown_input, "prediction": pred}
        if refs is not None:
            rec["reference"] = refs[i]
        records.append(rec)
    return records


def _classify(spec: PredictSpec, ctx: StageContext, info: Any, rows: Any) -> StageResult:
    """Label and label probabilities of a sequence classifier for every row."""
    from mlsteps.engine.data import require_columns
    from mlsteps.engine.inference import classify, load_for_inference
    from mlsteps.engine.modeling import loaded_metrics, loading_kwargs

    with field_scope("data"):
        require_columns(rows, [spec.input_column])
        texts = require_text(rows, spec.input_column, "input_column")
        if spec.reference_column is not None:
            require_columns(rows, [spec.reference_column])
    loaded = load_for_inference(
        info.source,
        trust_remote_code=spec.trust_remote_code,
        model_field="model",
        loading=loading_kwargs(spec),
    )
    ctx.log(f"classifying {len(texts)} rows with {spec.model}")
    batch = spec.generation.batch_size
    results = map_sharded(lambda xs: classify(loaded, xs, batch_size=batch), texts)
    refs = list(rows[spec.reference_column]) if spec.reference_column is not None else None
    records = []
    for i, (text, (label, probs)) in enumerate(zip(texts, results, strict=True)):
        rec: dict[str, Any] = {"index": i, "input": text, "label": label, "probabilities": probs}
        if refs is not None:
            rec["reference"] = refs[i]
        records.append(rec)
    write_jsonl(ctx.predictions_path, records)
    return StageResult(
        metrics={"predictions": len(records), **loaded_metrics(loaded.model, spec)},
        outputs={"predictions": str(ctx.predictions_path)},
    )
