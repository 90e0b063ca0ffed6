"""Model loading (recipe/specs/loading.py, engine/modeling.py, engine/lora.py) on tiny models (2 layers,
width 32): LoRA variants (all-linear, DoRA, rsLoRA) train and their adapters reload with plain
peft to the same predictions; half-precision frozen bases keep fp32 trainable weights; the
attention kernel is passed through and recorded; CUDA-only settings are refused up front."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mlsteps.context import StageContext
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages import finetune
from tests.integration.test_multi_validation import _TASKS, _toy
from tests.integration.test_multi_validation import bases as bases  # noqa: F401 - fixture
from tests.integration.test_multi_validation import one_thread as one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"target_modules": "all-linear", "use_dora": True, "use_rslora": True, "dropout": 0.0}


def _lora_spec(bases: dict[str, Path], task: str, **fields: Any) -> FinetuneSpec:
    spec = dict(_TASKS[task])
    data = str(spec.pop("data"))
    spec["from"] = str(bases[str(spec["from"])])
    if task != "classification":
        spec["validation_max_samples"] = 4
    return FinetuneSpec.model_validate(
        {
            "kind": "finetune", "task": task, **spec, "method": "lora", "lora": VARIANTS,
            "data": _toy(data, "train", ":48"), "validation": _toy(data, "validation", ":8"),
            "train": {"batch_size": 8, "max_steps": 4, "lr": 1e-2, "save_every_steps": 1000},
            **fields,
        }
    )  # fmt: skip


def _ctx(tmp_path: Path) -> StageContext:
    return StageContext(run_dir=tmp_path, stage="ft", kind="finetune", seed=0, quiet=True)


def _plain_peft(final: Path, task: str) -> Any:
    """The adapter as a user loads it: transformers for the base, peft for the adapter."""
    import transformers
    from peft import PeftModel

    cfg = json.loads((final / "adapter_config.json").read_text())
    auto = {
        "classification": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }.get(task, transformers.AutoModelForCausalLM)
    extra = {}
    if task == "classification":  # an adapter has no config.json to carry the label map
        meta = json.loads((final / "mlsteps_adapter.json").read_text())
        extra = {"num_labels": meta["num_labels"]}
    base = auto.from_pretrained(cfg["base_model_name_or_path"], **extra)
    return PeftModel.from_pretrained(base, final).eval()


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", "classification"])
def test_lora_variants_train_and_round_trip(
    task: str,
    bases: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    ctx = _ctx(tmp_path)
    m = finetune.run(_lora_spec(bases, task), ctx).metrics
    cfg = json.loads((ctx.final_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    # all-linear: every linear layer of every block (gpt2: Conv1D c_attn/c_proj/c_fc; bart:
    # q/k/v/out projections and fc1/fc2), not only the per-family attention default.
    leaves = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert leaves >= (
        {"c_attn", "c_proj", "c_fc"} if task != "seq2seq" else {"fc1", "fc2", "k_proj"}
    )
    weights = load_file(ctx.final_dir / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's trained magnitudes
    assert all(t.dtype == torch.float32 for t in weights.values())

    model = _plain_peft(ctx.final_dir, task)
    tok = AutoTokenizer.from_pretrained(ctx.final_dir)
    if task == "classification":
        from mlsteps.builtin import load_builtin

        rows = load_builtin("toy/sentiment", "validation")[:8]
        meta = json.loads((ctx.final_dir / "mlsteps_adapter.json").read_text())
        with torch.no_grad():
            ids = [
                int(model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1)) for r in rows
            ]
        hits = sum(meta["id2label"][str(i)] == r["label"] for i, r in zip(ids, rows, strict=True))
        assert hits / len(rows) == pytest.approx(m["val_accuracy"])
        return
    from mlsteps.engine.generation import generate
    from mlsteps.recipe.specs.model import GenerationSpec

    preds = [json.loads(line) for line in ctx.predictions_path.read_text().splitlines()]
    again = generate(
        model, tok, [p["input"] for p in preds], GenerationSpec(max_new_tokens=4), seed=0
    )
    assert again == [p["prediction"] for p in preds]


def test_half_precision_frozen_base_trains_fp32_weights(
    bases: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """model_dtype bf16 under LoRA on CPU: the base is stored in bf16, every trained weight
    (adapters and the classification head copy) stays fp32 and learns."""
    ctx = _ctx(tmp_path)
    spec = _lora_spec(bases, "classification", model_dtype="bf16", attn_implementation="eager")
    m = finetune.run(spec, ctx).metrics
    assert m["model_dtype"] == "bfloat16" and m["attn_implementation"] == "eager"
    weights = load_file(ctx.final_dir / "adapter_model.safetensors")
    head = [k for k in weights if "score" in k]
    assert head and all(t.dtype == torch.float32 for t in weights.values())
    assert any(float(t.abs().sum()) > 0 for k, t in weights.items() if "lora_B" in k)
    # The default is fp32 weights and transformers' default kernel.
    default = finetune.run(_lora_spec(bases, "classification"), _ctx(tmp_path / "d")).metrics
    assert default["model_dtype"] == "float32" and default["attn_implementation"] == "sdpa"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mlsteps", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


def test_attn_implementation_is_recorded_in_the_run(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("".join(f"line {i} of a small text\n" for i in range(60)))
    (tmp_path / "r.yaml").write_text(
        "name: r\nstages:\n"
        "  tok: {kind: tokenizer, data: c.txt, vocab_size: 300}\n"
        "  pt: {kind: pretrain, tokenizer: tok, data: c.txt, max_seq_len: 16,\n"
        "       model: {family: llama, n_layers: 2, hidden_size: 32, n_heads: 2},\n"
        "       attn_implementation: eager, train: {max_steps: 2, batch_size: 4}}\n"
        "  pred: {kind: predict, model: pt, data: c.txt, input_column: text,\n"
        "         model_dtype: bf16, attn_implementation: eager,\n"
        "         generation: {max_new_tokens: 2}}\n"
    )
    out = _cli(tmp_path, "run", "r.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs/r/metrics.json").read_text())["pt"]
    assert metrics["attn_implementation"] == "eager" and metrics["model_dtype"] == "float32"
    record = json.loads((tmp_path / "runs/r/pt/stage.json").read_text())
    assert record["metrics"]["attn_implementation"] == "eager"
    assert "eager" in (tmp_path / "runs/r/report.md").read_text()
    # predict reads the weights in bf16 (they stay frozen) with the kernel asked for.
    pred = json.loads((tmp_path / "runs/r/metrics.json").read_text())["pred"]
    assert pred["model_dtype"] == "bfloat16" and pred["attn_implementation"] == "eager"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
@pytest.mark.parametrize(
    ("setting", "key"),
    [("method: lora, quantization: {bits: 4}", "quantization"),
     ("method: lora, model_dtype: fp16", "model_dtype")],
)  # fmt: skip
def test_cuda_only_settings_are_refused_before_anything_is_written(
    tmp_path: Path, setting: str, key: str
) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "r.yaml").write_text(
        "name: r\nstages:\n"
        f"  ft: {{kind: finetune, task: causal_lm, from: gpt2, data: d.jsonl, {setting}}}\n"
    )
    out = _cli(tmp_path, "run", "r.yaml")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"stages.ft.{key}" in lines[0] and "CUDA" in lines[0], lines
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_quantization_is_wired_through_bitsandbytes_and_peft(
    bases: dict[str, Path],  # noqa: F811
) -> None:
    """What can be checked without a GPU: the recipe's quantization becomes transformers'
    BitsAndBytesConfig, and QLoRA's wrap calls peft's prepare_model_for_kbit_training (on an
    unquantized bf16 model it casts every weight to fp32, which a plain wrap does not)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mlsteps.engine import lora, modeling

    spec = _lora_spec(bases, "causal_lm", quantization={"bits": 4, "quant_type": "fp4"})
    kwargs = modeling.loading_kwargs(spec)
    bnb = kwargs["quantization_config"]
    assert isinstance(bnb, BitsAndBytesConfig) and bnb.load_in_4bit
    assert bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 0} and kwargs["dtype"] == torch.float32

    def base_dtypes(kbit: bool) -> set[torch.dtype]:
        model = AutoModelForCausalLM.from_pretrained(bases["gpt2"], dtype=torch.bfloat16)
        wrapped = lora.wrap(model, spec.lora, "causal_lm", kbit=kbit)
        return {p.dtype for n, p in wrapped.named_parameters() if "lora_" not in n}

    assert base_dtypes(kbit=False) == {torch.bfloat16}
    assert base_dtypes(kbit=True) == {torch.float32}


def test_soft_prompt_on_a_bf16_base_stays_fp32(
    bases: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from mlsteps.recipe.specs.prompt import PromptSpec
    from mlsteps.stages import prompt

    spec = PromptSpec.model_validate(
        {
            "kind": "prompt", "method": "prompt_tuning", "from": "base", "num_virtual_tokens": 4,
            "template": "{source} =>", "data": _toy("toy/translate", "train", ":16"),
            "validation": _toy("toy/translate", "validation", ":4"), "max_seq_len": 64,
            "model_dtype": "bf16", "attn_implementation": "eager",
            "train": {"batch_size": 8, "max_steps": 2, "save_every_steps": 1000},
        }
    )  # fmt: skip
    ctx = StageContext(
        run_dir=tmp_path, stage="pt", kind="prompt", seed=0, quiet=True,
        upstream={"base": bases["gpt2"]},
    )  # fmt: skip
    m = prompt.run(spec, ctx).metrics
    assert m["model_dtype"] == "bfloat16" and m["attn_implementation"] == "eager"
    assert math.isfinite(m["val_loss"])  # bf16 base, fp32 prompt
    weights = load_file(ctx.final_dir / "adapter_model.safetensors")
    assert [t.dtype for t in weights.values()] == [torch.float32]
