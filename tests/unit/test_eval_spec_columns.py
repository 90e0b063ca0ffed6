"""`mlsteps validate` catches eval columns that builtin data lacks (its columns are known)."""

from __future__ import annotations

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe


def _recipe(**eval_fields: object) -> dict:
    stage = {"kind": "eval", "models": ["gpt2"], "data": "builtin:toy/translate", **eval_fields}
    return {"name": "r", "stages": {"ev": stage}}


def test_reference_column_missing_from_builtin_data_is_a_validation_error() -> None:
    with pytest.raises(
        UserError, match="column 'answer' not found in builtin:toy/translate"
    ) as err:
        validate_recipe(_recipe(metrics=["response_perplexity"], reference_column="answer"))
    assert "stages.ev" in str(err.value.where) and "source, target; set reference_column" in str(
        err.value
    )


def test_each_metric_checks_only_the_columns_it_reads() -> None:
    # response_perplexity reads reference_column (+ the prompt), not text_column ('text').
    validate_recipe(_recipe(metrics=["response_perplexity", "bleu"]))
    with pytest.raises(UserError, match="set text_column \\(read by perplexity\\)"):
        validate_recipe(_recipe(metrics=["perplexity"]))
    validate_recipe(_recipe(metrics=["perplexity"], text_column="target"))
    with pytest.raises(UserError, match="column 'label' not found.*set label_column"):
        validate_recipe(_recipe(metrics=["accuracy"]))
