"""Model-loading recipe fields (recipe/specs/loading.py): model_dtype, attn_implementation,
quantization and the LoRA variants. Pure validation: no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe
from mlsteps.recipe.specs.loading import QuantizationSpec, needs_cuda


def _recipe(**stage: Any) -> dict[str, Any]:
    base = {"kind": "finetune", "task": "causal_lm", "from": "gpt2", "data": "d.jsonl"}
    return {"name": "r", "stages": {"ft": {**base, **stage}}}


def _at(err: UserError) -> str:
    """The dotted key of an error's place ('<recipe> (stages.x.y)' -> 'stages.x.y')."""
    return str(err.where).rsplit("(", 1)[-1].rstrip(")")


def _error(**stage: Any) -> UserError:
    with pytest.raises(UserError) as err:
        validate_recipe(_recipe(**stage))
    return err.value


def test_half_weights_only_where_they_stay_frozen() -> None:
    # Full fine-tuning would update bf16 weights without an fp32 master copy: refused, at the key.
    err = _error(model_dtype="bf16")
    assert _at(err) == "stages.ft.model_dtype" and "master copy" in str(err)
    assert "train.precision: bf16" in (err.hint or "")
    # A LoRA base is frozen: half precision is fine, and so is every dtype with LoRA.
    for dtype in ("auto", "fp32", "bf16", "fp16"):
        spec = validate_recipe(_recipe(method="lora", model_dtype=dtype)).stages["ft"]
        assert spec.model_dtype == dtype
    pretrain = {"kind": "pretrain", "from": "gpt2", "data": "d.txt", "model_dtype": "fp16"}
    with pytest.raises(UserError) as err:
        validate_recipe({"name": "r", "stages": {"pt": pretrain}})
    assert _at(err.value) == "stages.pt.model_dtype"
    # eval and predict only read weights.
    ev = {"kind": "eval", "models": ["gpt2"], "data": "d.jsonl", "metrics": ["perplexity"],
          "model_dtype": "bf16", "attn_implementation": "eager"}  # fmt: skip
    assert validate_recipe({"name": "r", "stages": {"ev": ev}}).stages["ev"].model_dtype == "bf16"


def test_weights_and_compute_in_two_different_half_types_are_refused() -> None:
    err = _error(method="lora", model_dtype="fp16", train={"precision": "bf16"})
    assert _at(err) == "stages.ft.model_dtype" and "model_dtype: bf16" in (err.hint or "")


def test_quantization_is_qlora_only() -> None:
    spec = validate_recipe(_recipe(method="lora", quantization={"bits": 4})).stages["ft"]
    assert spec.quantization.bnb_kwargs() == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }  # fmt: skip
    assert QuantizationSpec(bits=8).bnb_kwargs() == {"load_in_8bit": True}
    err = _error(quantization={"bits": 4})
    assert _at(err) == "stages.ft.quantization" and "method: lora" in (err.hint or "")
    err = _error(method="lora", merge=True, quantization={"bits": 4})
    assert _at(err) == "stages.ft.merge"
    # 4-bit settings under bits 8 would do nothing; bits must be 4 or 8, never a boolean.
    err = _error(method="lora", quantization={"bits": 8, "quant_type": "fp4"})
    assert _at(err) == "stages.ft.quantization.quant_type"
    for bits in (3, True, "4"):
        assert "bits" in str(_error(method="lora", quantization={"bits": bits}))


def test_attn_implementation_names() -> None:
    for name in ("eager", "sdpa", "flex_attention", "paged|sdpa", "kernels-community/flash-attn"):
        spec = validate_recipe(_recipe(attn_implementation=name)).stages["ft"]
        assert spec.attn_implementation == name
    err = _error(attn_implementation="fast")
    assert "unknown attn_implementation 'fast'" in str(err)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        err = _error(attn_implementation="flash_attention_2")
        assert _at(err) == "stages.ft.attn_implementation" and "flash_attn" in str(err)


def test_lora_variants() -> None:
    lora = {"target_modules": "all-linear", "use_dora": True, "use_rslora": True}
    spec = validate_recipe(_recipe(method="lora", lora=lora)).stages["ft"]
    assert spec.lora.target_modules == "all-linear" and spec.lora.use_dora and spec.lora.use_rslora
    assert validate_recipe(_recipe(method="lora", lora={"target_modules": ["c_attn"]}))
    assert "target_modules" in str(_error(method="lora", lora={"target_modules": "all_linear"}))


def test_hard_prompts_load_no_model_to_set_a_dtype_for() -> None:
    stage = {"kind": "prompt", "method": "zero_shot", "from": "gpt2", "model_dtype": "bf16"}
    with pytest.raises(UserError) as err:
        validate_recipe({"name": "r", "stages": {"p": stage}})
    assert _at(err.value) == "stages.p.model_dtype"


def test_needs_cuda_names_the_settings() -> None:
    spec = validate_recipe(
        _recipe(method="lora", quantization={"bits": 4}, model_dtype="fp16")
    ).stages["ft"]
    assert [k for k, _ in needs_cuda(spec)] == ["quantization", "model_dtype"]
    assert (
        needs_cuda(validate_recipe(_recipe(method="lora", model_dtype="bf16")).stages["ft"]) == []
    )


def test_validate_names_cuda_settings_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nstages:\n  ft: {kind: finetune, task: causal_lm, from: gpt2, data: d.jsonl,\n"
        "       method: lora, quantization: {bits: 4}, attn_implementation: sdpa}\n"
    )
    code = (
        "import sys; from mlsteps.cli import main; sys.argv = ['mlsteps', 'validate', 'r.yaml']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "note: stages.ft.quantization" in out.stdout and "CUDA" in out.stdout
