"""What every prompted model writes (prompts_preview.jsonl, prompt lengths) and a hard prompt's
final/: the prompt file and tokenizer, no weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsteps.context import StageContext, StageResult
from mlsteps.positions import config_max_positions
from mlsteps.prompt.prompter import Prompter, prompt_file
from mlsteps.recipe.specs.prompt import PromptSpec
from mlsteps.text_io import atomic_write_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREVIEW_FILE = "prompts_preview.jsonl"
# Rows whose prompts are measured (token length) for the prompt_tokens_* metrics.
LENGTH_SAMPLE_ROWS = 200


def prompt_length_metrics(
    prompter: Prompter, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]
) -> dict[str, float]:
    """Token length of rendered prompts (mean/max over a sample of rows)."""
    from mlsteps.prompt.scoring import encode_prompt

    seq2seq = prompter.model_kind == "seq2seq"
    lengths = [
        len(encode_prompt(tokenizer, prompter.render(r), seq2seq=seq2seq))
        for r in rows[:LENGTH_SAMPLE_ROWS]
    ]
    if not lengths:
        return {}
    return {
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 2),
        "prompt_tokens_max": max(lengths),
    }


def write_preview(ctx: StageContext, records: list[dict[str, Any]]) -> Path:
    """prompts_preview.jsonl: one JSON object per previewed row (prompt, target, outputs)."""
    return atomic_write_jsonl(ctx.stage_dir / PREVIEW_FILE, records)


class _NoWeights:
    """Hard prompts have no weights of their own: save_final writes tokenizer + json only."""

    def save_pretrained(self, directory: Any) -> None:
        return None


def finish_hard(
    spec: PromptSpec,
    ctx: StageContext,
    prompter: Prompter,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    config: Any,
) -> StageResult:
    from mlsteps.engine.training import save_final

    records: list[dict[str, Any]] = []
    for row in rows[: spec.preview_rows]:
        record: dict[str, Any] = {"prompt": prompter.render(row)}
        if spec.target_column in row:
            record["target"] = prompter.continuation(prompter.label_word(row[spec.target_column]))
        records.append(record)
    if not records:  # zero_shot without data: show the template and what it reads
        records.append({"template": prompter.template, "fields": prompter.fields})
    preview = write_preview(ctx, records)
    metrics: dict[str, Any] = {"trainable_params": 0, "num_demonstrations": prompter.shots}
    metrics.update(prompt_length_metrics(prompter, tokenizer, rows))
    limit = config_max_positions(config)
    if limit and metrics.get("prompt_tokens_max", 0) > limit:
        ctx.log(
            f"warning: prompts reach {metrics['prompt_tokens_max']} tokens but the model reads "
            f"{limit}; their start (demonstrations) will be cut"
        )
    final = save_final(
        _NoWeights(), tokenizer, ctx, extra_files=prompt_file(prompter, ctx.final_dir)
    )
    return StageResult(metrics=metrics, outputs={"final": str(final), "preview": str(preview)})
