"""What each stage of a recipe hands on, known from the recipe alone, and the stage/model
combinations that cannot work: `validate` refuses them before anything runs (a predict stage
given a masked LM used to fail only when the run reached it, after every training stage).

Only references to earlier stages are judged; a local directory or hub id is only known once
its config is read, which the stage itself does before any work. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlsteps.errors import UserError
from mlsteps.recipe.specs.evaluate import FITS, LABELS, LM_EVAL_KINDS
from mlsteps.recipe.specs.model import ENCODER_ONLY_FAMILIES

_ENCODER_ONLY = ENCODER_ONLY_FAMILIES
_ENCODER_DECODER = ("t5", "bart")
_KIND_NAMES = {
    "clm": "a causal LM",
    "mlm": "a masked LM",
    "seq2seq": "a seq2seq model",
    "classification": "a sequence classifier",
}
# Model kinds the predict stage can use (it imports this).
PREDICTABLE = ("clm", "seq2seq", "classification")


@dataclass(frozen=True)
class Output:
    """What a stage leaves in final/: ``kind`` is a model kind (clm, mlm, seq2seq,
    classification), 'tokenizer', or None when it writes no model; ``family`` the architecture
    family when known; ``labels``: a prompted model that ranks verbalizer words."""

    kind: str | None
    family: str | None = None
    labels: bool = False


def _output(stages: dict[str, Any], name: str, seen: dict[str, Output | None]) -> Output | None:
    """None when unknown (a stage that starts from a directory or hub id, or a future kind)."""
    if name in seen:
        return seen[name]
    spec = stages[name]
    kind = getattr(spec, "kind", None)
    source = _source(stages, getattr(spec, "from_", None), seen)
    arch = getattr(spec, "model", None)
    family = getattr(arch, "family", None) if arch is not None else None
    family = family or (source.family if source is not None else None)
    out: Output | None = None
    if kind == "tokenizer":
        out = Output("tokenizer")
    elif kind in ("eval", "predict"):
        out = Output(None)
    elif kind == "pretrain":
        out = Output(spec.objective, family)
    elif kind == "finetune":
        task = {"classification": "classification", "seq2seq": "seq2seq"}.get(spec.task, "clm")
        out = Output(task, family)
    elif kind == "prompt" and source is not None and source.kind is not None:
        labels = spec.task == "classification" and bool(spec.verbalizer)
        out = Output(source.kind, source.family, labels=labels or source.labels)
    seen[name] = out
    return out


def _source(stages: dict[str, Any], ref: Any, seen: dict[str, Output | None]) -> Output | None:
    return _output(stages, ref, seen) if isinstance(ref, str) and ref in stages else None


def _refuse(message: str, path: str, doc: Any, hint: str) -> None:
    raise UserError(message, where=doc.where(path) if doc else path, hint=hint)


def check_kinds(recipe: Any, doc: Any = None) -> None:
    """UserError for a reference whose stage cannot serve the referring stage (run after the
    references themselves are checked: every stage name used is an earlier stage)."""
    stages = dict(recipe.stages)
    seen: dict[str, Output | None] = {}
    for name, spec in stages.items():
        base = f"stages.{name}"
        kind = getattr(spec, "kind", None)
        if kind == "tokenizer":
            continue  # its 'from' takes the tokenizer of any stage
        model_fields = [f for f in getattr(spec, "REF_FIELDS", ()) if f != "tokenizer"]
        for field_name in model_fields:
            value = getattr(spec, field_name)
            key = type(spec).model_fields[field_name].alias or field_name
            for i, ref in enumerate(value if isinstance(value, list) else [value]):
                path = f"{base}.{key}" + (f".{i}" if isinstance(value, list) else "")
                out = _source(stages, ref, seen)
                if kind == "eval" and spec.lm_eval is not None:
                    _check_lm_eval(stages, ref, out, path, doc)
                if out is None:
                    continue  # unknown: the stage checks it when it reads the config
                if out.kind in ("tokenizer", None):
                    what = "a tokenizer, not a model" if out.kind else "no model"
                    ref_kind = str(stages[ref].kind)
                    article = "an" if ref_kind[0] in "aeiou" else "a"
                    _refuse(
                        f"'{ref}' is {article} {ref_kind} stage: it writes {what}",
                        path, doc, "name a stage that trains a model",
                    )  # fmt: skip
                _check_use(kind, spec, ref, out, path, doc)


def _check_lm_eval(
    stages: dict[str, Any], ref: str, out: Output | None, path: str, doc: Any
) -> None:
    """lm-eval's HF class scores plain causal LMs, LoRA adapters and seq2seq models; a prompted
    model (a prompt stage, or a directory with mlsteps_prompt.json) is refused: lm-eval would
    drop its template or misalign its soft prompt (see recipe.specs.evaluate.LM_EVAL_KINDS)."""
    import json
    from pathlib import Path

    from mlsteps.prompt.prompter import PROMPT_FILE

    prompted = ref in stages and stages[ref].kind == "prompt"
    prompt_file = Path(ref).expanduser() / PROMPT_FILE
    if ref not in stages and prompt_file.is_file():
        try:  # a fine-tune's template file (method 'finetune') is a plain model for lm-eval
            prompted = (
                json.loads(prompt_file.read_text(encoding="utf-8")).get("method") != "finetune"
            )
        except (OSError, ValueError, AttributeError):
            prompted = True  # unreadable: the eval stage names the problem when it loads it
    if prompted:
        _refuse(
            f"lm_eval cannot score the prompted model '{ref}': lm-eval renders each task's own "
            "prompts (a template would be dropped) and its HF class cannot take soft prompts",
            path, doc, "evaluate the prompt's base model with lm_eval, or score the prompted "
            "model with 'metrics' in an eval stage without lm_eval",
        )  # fmt: skip
    # A tokenizer or a stage without a model is refused with its own message by the caller.
    if out is not None and out.kind not in (*LM_EVAL_KINDS, "tokenizer", None):
        _refuse(
            f"lm_eval cannot score '{ref}', {_KIND_NAMES.get(str(out.kind), out.kind)}: "
            "lm-eval's HF class scores causal LMs and seq2seq models",
            path, doc, "give lm_eval a causal LM (or its LoRA adapter) or a seq2seq model",
        )  # fmt: skip


def _check_use(kind: Any, spec: Any, ref: str, out: Output, path: str, doc: Any) -> None:
    """UserError when stage ``spec`` (of ``kind``) cannot use ``ref``'s model ``out``."""
    what = f"'{ref}' is {_KIND_NAMES.get(str(out.kind), out.kind)}"
    if kind == "predict" and out.kind not in PREDICTABLE:
        _refuse(
            f"{what}: predict can neither generate text nor predict labels with it",
            path, doc, "predict needs a causal LM, a seq2seq model or a sequence classifier",
        )  # fmt: skip
    elif kind == "eval":
        usable = FITS.get(str(out.kind), frozenset()) | (LABELS if out.labels else frozenset())
        bad = [m for m in spec.metrics if m not in usable]
        if bad:
            _refuse(
                f"metric '{bad[0]}' does not fit model '{ref}', "
                f"{_KIND_NAMES.get(str(out.kind), out.kind)}",
                path, doc, f"metrics for this model: {', '.join(sorted(usable)) or 'none'}",
            )  # fmt: skip
    elif kind == "prompt" and out.kind not in ("clm", "seq2seq"):
        _refuse(
            f"{what}: prompts need a model that generates text",
            path, doc, "prompt a causal LM or a seq2seq model",
        )  # fmt: skip
    elif kind == "finetune" and spec.model is None:
        family = out.family
        if spec.task == "seq2seq" and (
            out.kind in ("clm", "mlm") or family and family not in _ENCODER_DECODER
        ):
            _refuse(
                f"{what}: task seq2seq needs an encoder-decoder model", path, doc,
                "start from a t5/bart stage, or use task causal_lm with a template",
            )  # fmt: skip
        if spec.task == "causal_lm" and (
            out.kind in ("mlm", "seq2seq") or family in _ENCODER_ONLY + _ENCODER_DECODER
        ):
            _refuse(
                f"{what}: task causal_lm needs a decoder model", path, doc,
                "start from a gpt2/llama stage, or use task classification",
            )  # fmt: skip
    elif kind == "pretrain" and getattr(spec, "model", None) is None:
        if out.kind in ("clm", "mlm", "seq2seq") and out.kind != spec.objective:
            _refuse(
                f"{what}: objective {spec.objective} cannot continue it",
                path, doc, f"set objective: {out.kind}, or start from another stage",
            )  # fmt: skip
