"""The `predict` stage: batched generation for every row, written in input order.

Each line of ``predictions.jsonl`` holds ``index``, ``input`` (the input column; for a prompted
model without that column, the rendered prompt), ``prediction`` and, when ``reference_column``
is set, ``reference``.
"""

from __future__ import annotations

from typing import Any

from mlsteps.context import StageContext, StageResult
from mlsteps.distributed import map_sharded
from mlsteps.errors import UserError
from mlsteps.specs.evaluate import PredictSpec
from mlsteps.stages.eval import generate_for, render_inputs, require_inputs, write_jsonl


def run(spec: PredictSpec, ctx: StageContext) -> StageResult:
    """Generate an output for every row of ``spec.data`` with ``spec.model``."""
    from mlsteps.engine.chat_data import reference_of
    from mlsteps.engine.data import load_rows, require_columns
    from mlsteps.engine.inference import inspect_source, load_for_inference

    where = f"stages.{ctx.stage}"
    info = inspect_source(
        ctx.resolve_source(spec.model),
        trust_remote_code=spec.trust_remote_code,
        where=f"{where}.model",
    )
    if info.kind not in ("clm", "seq2seq"):
        raise UserError(
            f"model '{spec.model}' is a {info.kind} model and cannot generate text",
            where=f"{where}.model",
            hint="predict needs a causal LM or a seq2seq model",
        )
    rows = load_rows(spec.data, where=f"{where}.data", cache_dir=ctx.cache_dir)
    prompter = info.prompter
    column: list[str] | None = None
    if prompter is None or spec.input_column in rows.column_names:
        require_columns(rows, [spec.input_column], f"{where}.data")
        column = require_inputs(rows, spec.input_column, f"{where}.data")
    if spec.reference_column is not None:
        require_columns(rows, [spec.reference_column], f"{where}.data")
    if prompter is not None:
        prompter.check_columns(rows.column_names, where=f"{where}.data")
        inputs = [prompter.render(row, where=f"{where}.data") for row in rows]
    else:
        assert column is not None
        inputs = column
    shown = column if column is not None else inputs

    loaded = load_for_inference(
        info.source, trust_remote_code=spec.trust_remote_code, where=f"{where}.model"
    )
    if prompter is None:  # conversations go through the model's chat template
        inputs = render_inputs(loaded, inputs, f"{where}.data", spec.input_column)
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
    records = []
    for i, (shown_input, pred) in enumerate(zip(shown, preds, strict=True)):
        rec: dict[str, Any] = {"index": i, "input": shown_input, "prediction": pred}
        if refs is not None:
            rec["reference"] = refs[i]
        records.append(rec)
    write_jsonl(ctx.predictions_path, records)
    return StageResult(
        metrics={"predictions": len(records)},
        outputs={"predictions": str(ctx.predictions_path)},
    )
