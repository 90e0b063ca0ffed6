"""The eval stage's scoring of one loaded model: one scorer per option family of the metric
table (metrics/table.py), run in metrics.json's order, and the prediction records they fill."""

from __future__ import annotations

from typing import Any

from mlsteps.context import StageContext
from mlsteps.distributed import all_gather_object, is_distributed, map_sharded, shard_indices
from mlsteps.engine.rows import generate_for, render_inputs, require_inputs, require_text
from mlsteps.errors import HERE, field_scope
from mlsteps.metrics import table
from mlsteps.recipe.specs.evaluate import EvalSpec


def score_model(
    spec: EvalSpec,
    ctx: StageContext,
    loaded: Any,
    rows: Any,
    metrics: list[str],
    data: dict[str, Any],
    reuse: dict[str, list[list[float]]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of one loaded model, and its prediction records (empty when it predicts nothing).
    Each option family of the metric table has one scorer below, run in _SCORERS' order.
    ``reuse``: uncalibrated label scores of the stage's earlier models, by ``_reuse_key``."""
    out: dict[str, Any] = {}
    records: list[dict[str, Any]] = [{"index": i} for i in range(rows.num_rows)]
    predicted = False
    job = _Job(spec, ctx, loaded, rows, data, records, reuse)
    for family, scorer in _SCORERS:
        wanted = [m for m in metrics if table.BY_NAME[m].family == family]
        if wanted:
            out.update(scorer(job, wanted))
            predicted |= family in ("generation", "labels")
    return out, records if predicted else []


class _Job:
    """What every family scorer reads: one loaded model on the eval rows."""

    def __init__(self, spec: EvalSpec, ctx: StageContext, loaded: Any, rows: Any,
                 data: dict[str, Any], records: list[dict[str, Any]],
                 reuse: dict[str, list[list[float]]]) -> None:  # fmt: skip
        self.spec, self.ctx, self.loaded, self.rows = spec, ctx, loaded, rows
        self.data, self.records, self.reuse = data, records, reuse


def _score_perplexity(job: _Job, wanted: list[str]) -> dict[str, Any]:
    with field_scope("metrics"):
        res = _causal_perplexity(job.spec, job.loaded, job.data["text"])
    return {
        "perplexity": res.perplexity,
        "bits_per_byte": res.bits_per_byte,
        "word_perplexity": res.word_perplexity,
        "perplexity_tokens": res.scored_tokens,
        "perplexity_convention": res.convention,
    }


def _score_masked(job: _Job, wanted: list[str]) -> dict[str, Any]:
    ppl, out = job.spec.perplexity, {}
    for name in ("masked_perplexity", "pseudo_perplexity"):  # the order of metrics.json
        if name not in wanted:
            continue
        options = {"mask_seed": ppl.mask_seed, "mask_fraction": ppl.mask_fraction}
        with field_scope("metrics"):
            res = table.compute_function(name)(
                job.loaded.model,
                job.loaded.tokenizer,
                job.data["text"],
                **(options if name == "masked_perplexity" else {}),
                window_tokens=ppl.window,
                batch_size=ppl.batch_size,
            )
        out.update({name: res.perplexity, f"{name}_convention": res.convention})
    return out


def _score_response(job: _Job, wanted: list[str]) -> dict[str, Any]:
    refs = job.data["references"]
    return dict(_response_perplexity(job.spec, job.ctx, job.loaded, job.rows, refs).metrics())


def _score_preference(job: _Job, wanted: list[str]) -> dict[str, Any]:
    scores = table.compute_function("preference_accuracy")
    with field_scope("metrics"):
        return dict(scores(job.loaded, job.data["pairs"], job.spec.generation.batch_size))


def _score_generation(job: _Job, wanted: list[str]) -> dict[str, Any]:
    from mlsteps.metrics.generated import score_texts

    spec, ctx, loaded = job.spec, job.ctx, job.loaded
    inputs = _inputs(spec, job.rows, loaded.prompter, loaded)
    ctx.log(f"generating {len(inputs)} outputs")
    preds = map_sharded(lambda xs: generate_for(loaded, xs, spec.generation, ctx), inputs)
    post = getattr(loaded.prompter, "postprocess", None)
    preds = [post(p) for p in preds] if post else preds
    refs = job.data["references"]
    with field_scope("metrics"):
        out = score_texts(preds, refs, wanted, target_lang=spec.target_lang)
    for rec, src, pred, ref in zip(job.records, inputs, preds, refs, strict=True):
        rec.update(input=src, prediction=pred, reference=ref)
    return out


def _score_labels(job: _Job, wanted: list[str]) -> dict[str, Any]:
    from mlsteps.metrics.generated import LABEL_METRICS, score_labels

    shown, predicted = _predict_labels(job)
    gold = job.data["labels"]
    ordered = [m for m in LABEL_METRICS if m in wanted]
    with field_scope("metrics"):
        out = score_labels(predicted, gold, ordered)
    for rec, src, pred, g in zip(job.records, shown, predicted, gold, strict=True):
        rec.setdefault("input", src)
        rec.update(predicted_label=pred, label=g)
    return out


# Family scorers in the order their keys appear in metrics.json (generation before labels: a
# label record keeps the generation input when both run).
_SCORERS = (
    ("perplexity", _score_perplexity),
    ("masked", _score_masked),
    ("response", _score_response),
    ("preference", _score_preference),
    ("generation", _score_generation),
    ("labels", _score_labels),
)


def _predict_labels(job: _Job) -> tuple[list[str], list[str]]:
    """(model inputs, predicted labels): a classifier's arg-max, else rank classification."""
    from mlsteps.engine.inference import predict_labels

    spec, loaded = job.spec, job.loaded
    batch = spec.generation.batch_size
    if loaded.kind == "classification":
        with field_scope("data"):
            texts = require_text(job.rows, spec.input_column, "input_column")
        return texts, map_sharded(lambda xs: predict_labels(loaded, xs, batch_size=batch), texts)
    from mlsteps.prompt.calibration import calibrated_labels, prompted_label_scores

    prompter = loaded.prompter
    prompts = _inputs(spec, job.rows, prompter)
    key = _reuse_key(loaded, prompts)
    scores = job.reuse.get(key) if key else None
    if scores is None:
        scores = map_sharded(
            lambda xs: prompted_label_scores(
                loaded.model, loaded.tokenizer, prompter, xs, batch_size=batch
            ),
            prompts,
        )
        if key:
            job.reuse[key] = scores
    else:
        job.ctx.log("label scores reused: same weights, tokenizer, prompts and verbalizer")
    # Calibrated as the prompted model says (mlsteps_prompt.json "calibration").
    predicted = calibrated_labels(
        loaded.model, loaded.tokenizer, prompter, scores, batch_size=batch
    )
    return prompts, predicted


def _reuse_key(loaded: Any, prompts: list[str]) -> str | None:
    """What the uncalibrated label scores depend on: the weights (only a prompted model that
    loads its base model as it is, without adapter or soft prompt), the tokenizer, the prompts,
    the answer prefix and the verbalizer. None: nothing to share (weights of its own, or a
    tokenizer without a serialisable backend)."""
    import hashlib
    import json

    backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
    prompter = loaded.prompter
    if not loaded.weights or backend is None or prompter is None or prompter.verbalizer is None:
        return None
    tok = loaded.tokenizer
    parts = [
        loaded.weights,
        backend.to_str(),
        repr(sorted(tok.special_tokens_map.items())),
        f"{tok.padding_side} {tok.truncation_side} {tok.model_max_length}",
        prompter.answer_prefix,
        json.dumps(list(prompter.verbalizer.items()), ensure_ascii=False),
        *prompts,
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _response_perplexity(
    spec: EvalSpec, ctx: StageContext, loaded: Any, rows: Any, refs: list[Any]
) -> Any:
    """The references given each row's prompt, rendered by ``_inputs`` as for generation."""
    from mlsteps.metrics.classification import as_reference_lists
    from mlsteps.metrics.response_perplexity import describe_prompt, sharded_response_perplexity

    ppl = spec.perplexity
    prompts = _inputs(spec, rows, loaded.prompter, loaded)
    with field_scope("data"):
        references = as_reference_lists(refs)
    with field_scope("metrics"):
        return sharded_response_perplexity(
            loaded.model,
            loaded.tokenizer,
            prompts,
            references,
            answer_prefix=loaded.prompter.answer_prefix if loaded.prompter is not None else "",
            prompt_note=describe_prompt(loaded.prompter, spec.input_column),
            window_tokens=ppl.window,
            stride_tokens=ppl.stride,
            batch_size=ppl.batch_size,
        )


@field_scope("data")
def _inputs(spec: EvalSpec, rows: Any, prompter: Any, loaded: Any = None) -> list[str]:
    """Model inputs: the prompter's rendering of each row, else the input column (conversations
    rendered with the model's chat template). Errors are about the data."""
    if prompter is None:
        values = require_inputs(rows, spec.input_column)
        return render_inputs(loaded, values, spec.input_column) if loaded else values
    prompter.check_columns(rows.column_names, field=HERE)
    return [prompter.render(row, field=HERE) for row in rows]


def _causal_perplexity(spec: EvalSpec, loaded: Any, texts: list[str]) -> Any:
    """Corpus perplexity; in a multi-process run each rank scores a disjoint share of the
    windows (document and stream mode alike) and the sums are added, so every window is scored
    exactly once."""
    from mlsteps.metrics.perplexity import PerplexityResult, causal_lm_perplexity

    ppl = spec.perplexity

    def score(shard: Any) -> PerplexityResult:
        return causal_lm_perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            window_tokens=ppl.window,
            stride_tokens=ppl.stride,
            mode=ppl.mode,
            batch_size=ppl.batch_size,
            shard=shard,
        )

    if not is_distributed():
        return score(None)
    mine = score(shard_indices)  # shard_indices(n): this rank's share of n windows
    sums = all_gather_object((mine.nll_sum_nats, mine.scored_tokens))
    total = sum(tokens for _, tokens in sums)
    return PerplexityResult(
        nll_sum_nats=sum(nll for nll, _ in sums),
        scored_tokens=total,
        utf8_bytes=mine.utf8_bytes,  # every rank counted all of the text
        words=mine.words,
        convention=mine.convention.replace(f"/{mine.scored_tokens} tokens", f"/{total} tokens"),
    )
