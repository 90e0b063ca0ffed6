"""Fine-tuning validation and hand-over: classification metrics and weighted loss, validation
by generation (BLEU/chrF/ROUGE), predictions.jsonl, and the prompt file that lets eval/predict
build model inputs exactly as training did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch

from mlsteps.context import StageContext
from mlsteps.engine.generation import generate
from mlsteps.errors import field_scope
from mlsteps.metrics import classification as cls_metrics
from mlsteps.metrics import text as text_metrics
from mlsteps.prompt.prompter import Prompter, prompt_file
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages.finetune.data import as_text, split_trailing_spaces
from mlsteps.templates import Renderer, TemplateFormat
from mlsteps.text_io import atomic_write_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def classification_metrics() -> Callable[..., dict[str, float]]:
    """Trainer ``compute_metrics``: accuracy and macro-F1 of the argmax class (called while the
    stage trains: its errors are the stage's)."""

    def compute(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predicted = np.asarray(logits).argmax(-1).tolist()
        gold = np.asarray(pred.label_ids).tolist()
        return {
            "accuracy": cls_metrics.accuracy(predicted, gold),
            "macro_f1": cls_metrics.macro_f1(predicted, gold),
        }

    return compute


def weighted_loss(weights: list[float]) -> Callable[..., torch.Tensor]:
    """Trainer ``compute_loss_func``: class-weighted cross-entropy. The sum is divided by the
    number of labelled items in the whole accumulated batch when the Trainer gives it, so
    gradient accumulation stays exact."""
    weight = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = torch.nn.functional.cross_entropy(
            logits.float(), labels, weight=weight.to(logits.device), reduction="sum"
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        return total / denominator

    return loss


def references(values: list[Any], column: str) -> list[list[str]]:
    """Every reference of each row (a list column keeps all of them)."""
    out = []
    for i, value in enumerate(values):
        items = value if isinstance(value, list) else [value]
        out.append([as_text(v, column=column, row=i) for v in items])
    return out


class GenerationEval:
    """``extra_eval`` hook of the training wrapper: generate for the validation sample and score
    it; keeps the last outputs for predictions.jsonl. It runs later, while the stage trains:
    ``field`` (the validation set's, relative to the stage) is scoped then."""

    def __init__(
        self,
        spec: FinetuneSpec,
        tokenizer: PreTrainedTokenizerBase,
        inputs: list[str],
        refs: list[list[str]],
        *,
        seed: int,
        field: str,
    ):
        self.spec, self.tokenizer, self.inputs, self.refs = spec, tokenizer, inputs, refs
        self.seed, self.field = seed, field
        self.outputs: list[str] | None = None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        spec, refs = self.spec, self.refs
        with field_scope("generation"):
            self.outputs = outs = generate(
                model, self.tokenizer, self.inputs, spec.generation, seed=self.seed
            )
        with field_scope(self.field):
            results = {
                **text_metrics.bleu(outs, refs, target_lang=spec.target_lang),
                **text_metrics.chrf(outs, refs),
                **text_metrics.rouge(outs, refs, target_lang=spec.target_lang),
            }
        scores: dict[str, float] = {}
        for name, value in results.items():
            if isinstance(value, float):  # conventions go to the stage metrics once, at the end
                scores[f"val_{name}"] = round(value, 4)
        return scores

    def conventions(self) -> dict[str, str]:
        """Signature/convention strings of the metrics (they depend on language and settings,
        not on the outputs, so a placeholder hypothesis gives the same strings)."""
        dummy = ["x"] * len(self.refs)
        lang = self.spec.target_lang
        out: dict[str, str] = {}
        for result in (
            text_metrics.bleu(dummy, self.refs, target_lang=lang),
            text_metrics.chrf(dummy, self.refs),
            text_metrics.rouge(dummy, self.refs, target_lang=lang),
        ):
            out.update({f"val_{k}": v for k, v in result.items() if isinstance(v, str)})
        return out

    def write_predictions(self, ctx: StageContext, set_name: str = "") -> None:
        """predictions.jsonl of the last validation generation, in validation order (atomic);
        a named validation set writes predictions_<name>.jsonl."""
        assert self.outputs is not None
        path = ctx.predictions_path
        if set_name:
            path = path.with_name(f"{path.stem}_{set_name}{path.suffix}")
        atomic_write_jsonl(
            path,
            (
                {"input": text, "prediction": pred, "references": refs}
                for text, pred, refs in zip(self.inputs, self.outputs, self.refs, strict=True)
            ),
        )


def prompter_json(
    spec: FinetuneSpec, ctx: StageContext, rows: datasets.Dataset, source: str | None
) -> dict[str, str]:
    """``{mlsteps_prompt.json: text}`` for final/ when training built inputs with a template or
    source_prefix, so that eval and predict build them the same way; else ``{}``.

    Always written then: eval/predict render the template with the very renderer training used
    (mlsteps/templates.py), odd column names ("Hi.") and list-valued columns included.
    """
    separator = ""
    fmt: TemplateFormat = "format"
    if spec.task == "seq2seq" and spec.source_prefix:
        escaped = spec.source_prefix.replace("{", "{{").replace("}", "}}")
        template, target = f"{escaped}{{{spec.source_column}}}", spec.target_column
    elif spec.task == "causal_lm" and spec.template:
        target = spec.response_column
        fmt = Renderer(spec.template, spec.template_format).fmt
        # Trailing spaces belong to the answer side, as in training (split_trailing_spaces).
        template, separator = split_trailing_spaces(spec.template)
    else:
        return {}  # the raw input column is the model input: eval's input_column says it all
    adapter = spec.method == "lora" and not spec.merge
    prompter = Prompter(
        method="finetune",
        template=template,
        template_format=fmt,
        answer_separator=separator,
        target_column=target,
        base_model=source if adapter and source else "",
        has_adapter=adapter,
        model_kind="seq2seq" if spec.task == "seq2seq" else "causal",
    )
    return prompt_file(prompter, ctx.final_dir)
