"""Outputs other tools can use: adapters and prompted models load from any working directory and
after their run directory was moved; a bf16 model is fine-tuned with fp32 weights.

The runs are real ``python -m mlsteps`` processes started from chosen working directories (the
point is where relative paths would resolve), on tiny models (gpt2, 2 layers, width 32) and
builtin data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = """\
name: port
seed: 7
defaults:
  train: {batch_size: 4, log_every_steps: 1, save_every_steps: 1000, precision: fp32,
          lr: 1.0e-3, warmup_steps: 0}
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/corpus, max_samples: 300}
    vocab_size: 300
    min_frequency: 2
  pre:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 128}
    data: {builtin: toy/corpus, max_samples: 60}
    validation_fraction: 0
    max_seq_len: 32
    train: {max_steps: 2}
  lora:
    kind: finetune
    task: causal_lm
    method: lora
    from: pre
    data: {builtin: toy/translate, max_samples: 24}
    validation_fraction: 0
    prompt_column: source
    response_column: target
    max_seq_len: 48
    lora: {r: 4, alpha: 8, dropout: 0.0}
    train: {max_steps: 2}
  soft:
    kind: prompt
    method: prompt_tuning
    from: pre
    data: {builtin: toy/translate, max_samples: 24}
    template: "{source} ="
    num_virtual_tokens: 4
    max_seq_len: 48
    preview_rows: 1
    train: {max_steps: 2}
  ev:
    kind: eval
    models: [lora, soft]
    data: {builtin: toy/translate, split: test, max_samples: 4}
    metrics: [chrf]
    generation: {max_new_tokens: 3}
"""

AFTER = """\
name: after
stages:
  ev:
    kind: eval
    models: [{lora}, {soft}]
    data: {{builtin: toy/translate, split: test, max_samples: 4}}
    metrics: [chrf]
    generation: {{max_new_tokens: 3}}
  pred:
    kind: predict
    model: {lora}
    data: {{builtin: toy/translate, split: test, max_samples: 4}}
    generation: {{max_new_tokens: 3}}
"""


def mlsteps(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    # The checkout under test, whatever the working directory.
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "mlsteps", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run above, started with a relative --run-dir from its own working directory."""
    work = tmp_path_factory.mktemp("work")
    (work / "train.yaml").write_text(TRAIN, encoding="utf-8")
    res = mlsteps("run", "train.yaml", "--run-dir", "runs/port", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "runs" / "port"


def _chrf(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())["ev"]
    return {model: values["chrf"] for model, values in metrics.items()}


def test_adapter_config_names_the_base_by_absolute_path(trained: Path) -> None:
    for stage in ("lora", "soft"):
        config = json.loads((trained / stage / "final" / "adapter_config.json").read_text())
        base = Path(config["base_model_name_or_path"])
        assert base.is_absolute() and base == (trained / "pre" / "final").absolute(), config


def test_plain_peft_loads_the_adapter_from_another_directory(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(trained / "lora" / "final"))
    assert model.peft_config["default"].r == 4


@pytest.mark.parametrize("how", ["move", "copy"])
def test_adapters_and_prompted_models_load_after_the_run_dir_moved(
    trained: Path, tmp_path: Path, how: str
) -> None:
    """Moved (the old place gone) or copied (then the original deleted), then loaded by eval
    and predict from yet another working directory: the same scores as in the original run."""
    reference = _chrf(trained)
    original = tmp_path / "original"
    shutil.copytree(trained.parent.parent, original)  # a private copy of the whole work dir
    moved = tmp_path / "elsewhere" / "port"
    moved.parent.mkdir()
    if how == "move":
        shutil.move(original / "runs" / "port", moved)
    else:
        shutil.copytree(original / "runs" / "port", moved)
        shutil.rmtree(original)
    (moved / ".lock").unlink(missing_ok=True)
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    recipe = cwd / "after.yaml"
    lora, soft = moved / "lora" / "final", moved / "soft" / "final"
    recipe.write_text(AFTER.format(lora=lora, soft=soft), encoding="utf-8")
    res = mlsteps("run", recipe, "--run-dir", "out", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    scores = _chrf(cwd / "out")
    assert scores == {str(lora): reference["lora"], str(soft): reference["soft"]}
    assert len((cwd / "out" / "pred" / "predictions.jsonl").read_text().splitlines()) == 4


# ---------------------------------------------------------------- precision of loaded weights

BF16_RUN = """\
name: bf16
seed: 7
defaults:
  train: {{batch_size: 4, log_every_steps: 1, save_every_steps: 1, keep_checkpoints: 1,
          precision: fp32, lr: 1.0e-3, warmup_steps: 0, max_steps: 1}}
stages:
  full:
    kind: finetune
    task: causal_lm
    from: {base}
    data: {{builtin: toy/translate, max_samples: 8}}
    validation_fraction: 0
    prompt_column: source
    response_column: target
    max_seq_len: 48
  merged:
    kind: finetune
    task: causal_lm
    method: lora
    merge: true
    from: {base}
    data: {{builtin: toy/translate, max_samples: 8}}
    validation_fraction: 0
    prompt_column: source
    response_column: target
    max_seq_len: 48
  pre:
    kind: pretrain
    objective: clm
    from: {base}
    data: {{builtin: toy/corpus, max_samples: 20}}
    validation_fraction: 0
    max_seq_len: 32
  soft:
    kind: prompt
    method: prompt_tuning
    from: {base}
    data: {{builtin: toy/translate, max_samples: 8}}
    template: "{{source}} ="
    num_virtual_tokens: 4
    max_seq_len: 48
    preview_rows: 1
"""


def _dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}  # noqa: SIM118


def test_bf16_model_is_trained_and_saved_in_fp32(trained: Path, tmp_path: Path) -> None:
    """A model stored in bf16, trained with precision fp32: the weights the trainer holds (as
    its checkpoint shows) and the saved results are fp32, for fine-tuning (full and merged
    LoRA), continued pretraining and prompt tuning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-model"
    source = trained / "pre" / "final"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(base)
    assert _dtypes(base / "model.safetensors") == {"BF16"}

    (tmp_path / "bf16.yaml").write_text(BF16_RUN.format(base=base), encoding="utf-8")
    res = mlsteps("run", "bf16.yaml", "--run-dir", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    for stage in ("full", "pre"):
        (checkpoint,) = (run / stage / "checkpoints").glob("checkpoint-*")
        assert _dtypes(checkpoint / "model.safetensors") == {"F32"}, stage
        assert _dtypes(run / stage / "final" / "model.safetensors") == {"F32"}, stage
    assert _dtypes(run / "merged" / "final" / "model.safetensors") == {"F32"}
    assert _dtypes(run / "soft" / "final" / "adapter_model.safetensors") == {"F32"}
