"""Errors raised inside a stage name the recipe field they are about: the raising code gives a
path relative to itself, the callers' field_scope and the stage boundary put the rest in front
(mlsteps/errors.py). Each case here named a place that is not a recipe key before the rework:
``lora.target_modules`` without its stage, ``stages.ev.models.attn_implementation`` (eval has
one attn_implementation, not one per model) and ``stages.attn_implementation`` (preference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlsteps.context import StageContext
from mlsteps.errors import UserError
from tests.integration.test_finetune import _ctx, _spec, _toy
from tests.integration.test_finetune import assets as assets  # noqa: F401 - fixture


def test_lora_without_default_targets_is_named_under_its_stage(
    assets: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model type that neither mlsteps' nor peft's table knows (both emptied here: every
    family mlsteps builds is in them) needs lora.target_modules, named at the stage's key."""
    from peft.utils import constants

    from mlsteps.engine import lora
    from mlsteps.stages.finetune import run

    monkeypatch.setattr(lora, "DEFAULT_TARGETS", {})
    monkeypatch.setattr(constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    spec = _spec(
        task="causal_lm",
        **{"from": str(assets["gpt2"])},
        method="lora",
        data=_toy("toy/translate", "train", 20),
        prompt_column="source",
        response_column="target",
    )
    with pytest.raises(UserError) as err:
        run(spec, _ctx(tmp_path))
    assert err.value.where == "stages.ft.lora.target_modules"
    assert str(err.value).startswith(
        "stages.ft.lora.target_modules: no default LoRA target modules for model type 'gpt2'"
    )


def _flash_missing() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return True
    return False


needs_no_flash = pytest.mark.skipif(
    not _flash_missing(), reason="flash_attn is installed: the kernel would load"
)


@needs_no_flash
def test_eval_attn_implementation_is_the_stage_field_not_the_model(
    assets: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The kernel fails for real (flash_attn is not installed); the stage is called directly, as
    the recipe check that refuses this up front is not on this path."""
    from mlsteps.recipe.specs.data import DataSpec
    from mlsteps.recipe.specs.evaluate import EvalSpec
    from mlsteps.stages import eval as eval_stage

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"a b c {i}"}) + "\n" for i in range(4)))
    spec = EvalSpec(
        kind="eval",
        models=[str(assets["gpt2"])],
        data=DataSpec(files=[str(data)]),
        metrics=["perplexity"],
        attn_implementation="flash_attention_2",
    )
    ctx = StageContext(run_dir=tmp_path / "run", stage="ev", kind="eval", seed=0, quiet=True)
    with pytest.raises(UserError) as err:
        eval_stage.run(spec, ctx)
    assert err.value.where == "stages.ev.attn_implementation", str(err.value)
    assert "attn_implementation 'flash_attention_2' cannot be used" in str(err.value)


@needs_no_flash
def test_preference_attn_implementation_names_its_stage(
    assets: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages import preference

    spec: Any = PreferenceSpec.model_validate(
        {
            "kind": "preference",
            "method": "dpo",
            "from": str(assets["gpt2"]),
            "data": {"builtin": "toy/preference", "max_samples": 8},
            "validation_fraction": 0,
            "attn_implementation": "flash_attention_2",
        }
    )
    ctx = StageContext(run_dir=tmp_path / "run", stage="dpo", kind="preference", seed=0, quiet=True)
    with pytest.raises(UserError) as err:
        preference.run(spec, ctx)
    assert err.value.where == "stages.dpo.attn_implementation", str(err.value)
