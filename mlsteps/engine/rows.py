"""Rows in, records out, shared by the eval and predict stages: a data set's columns read as
checked model inputs, generation for a loaded model (soft-prompt models take their own path),
and the per-row records written once (rank 0)."""

from __future__ import annotations

from typing import Any

from mlsteps.context import StageContext
from mlsteps.distributed import is_main
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.model import GenerationSpec
from mlsteps.text_io import atomic_write_jsonl


def column_values(rows: Any, column: str) -> list[Any]:
    """A column's cells as a list (a data set's column, a dict's list)."""
    return list(rows[column])


def require_text(rows: Any, column: str, option: str) -> list[str]:
    """Values of a text column; UserError naming the first row that is not a string."""
    values = column_values(rows, column)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            kind = "a list" if isinstance(value, list) else type(value).__name__
            raise UserError(
                f"column '{column}' row {i} is {kind}, expected text",
                field=HERE,
                hint=f"set {option} to a text column (join lists of sentences when preparing data)",
            )
    return values


def require_inputs(rows: Any, column: str) -> list[Any]:
    """Values of the input column: text, or conversations (a chat model answers their last
    user turn; see ``render_inputs``). UserError naming the first other cell."""
    from mlsteps.engine.chat_data import is_conversation

    values = column_values(rows, column)
    if values and is_conversation(values[0]):
        return values
    return require_text(rows, column, "input_column")


def render_inputs(loaded: Any, values: list[Any], column: str) -> list[str]:
    """Model inputs: conversations through the model's chat template (generation prompt)."""
    from mlsteps.engine.chat_data import generation_input

    return [
        generation_input(loaded.tokenizer, v, row=i, column=column) for i, v in enumerate(values)
    ]


def generate_for(
    loaded: Any, inputs: list[str], gen: GenerationSpec, ctx: StageContext
) -> list[str]:
    """Generate with a loaded model; soft-prompt (peft prompt-learning) models take the exact,
    cache-free path of :func:`mlsteps.prompt.soft_prompt.generate_prompted` (peft 0.21 with
    transformers 5 re-inserts the virtual tokens at every cached decoding step)."""
    from mlsteps.engine.generation import generate

    seed = gen.seed if gen.seed is not None else ctx.seed
    active = getattr(loaded.model, "active_peft_config", None)
    if active is not None and getattr(active, "is_prompt_learning", False):
        from mlsteps.prompt.soft_prompt import generate_prompted

        with field_scope("generation"):
            return generate_prompted(loaded.model, loaded.tokenizer, inputs, gen, seed=seed)
    with field_scope("generation"):
        return generate(loaded.model, loaded.tokenizer, inputs, gen, seed=seed)


def write_jsonl(path: Any, records: list[dict[str, Any]]) -> None:
    if not is_main():
        return  # every rank holds the gathered records; rank 0 writes them
    atomic_write_jsonl(path, records)
