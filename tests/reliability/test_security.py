"""Hostile files and names: nothing from a checkpoint, model directory, template or recipe runs
code; trust_remote_code is only ever passed when the recipe asks; names stay inside the run dir.

The malicious pickles below run ``os.system("touch MARKER")`` when unpickled by a plain
``pickle``/``torch.load(weights_only=False)``. Every test asserts the marker is absent afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from relkit import MINI, REPO, Result, cli, copy_run, read_json, tree_hashes


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def write_evil_torch_file(path: Path, marker: Path) -> None:
    """A file in torch.save's zip format whose pickle calls os.system on load."""
    import torch

    torch.save({"state": _Evil(marker), "param_groups": []}, path)


def _interrupt_pre(run_dir: Path) -> Path:
    """Make 'pre' look interrupted (same fingerprint, no final/): a rerun resumes a checkpoint."""
    state = read_json(run_dir / "state.json")
    state["stages"]["pre"].update(status="failed", interrupted=True)
    (run_dir / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run_dir / "pre" / "final")
    return run_dir / "pre" / "checkpoints" / "checkpoint-8"


def _remark(checkpoint: Path) -> None:
    """Rewrite the COMPLETE manifest so the tampered checkpoint passes the completeness check."""
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    from mlsteps.engine.checkpoints import file_sha256

    for name in manifest["files"]:
        manifest["files"][name] = (checkpoint / name).stat().st_size
        manifest["sha256"][name] = file_sha256(checkpoint / name)
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest))


def _assert_clean_outcome(res: Result, marker: Path) -> None:
    assert not marker.exists(), "a pickle in a checkpoint executed code"
    assert "Traceback" not in res.err, res.err[-3000:]
    if res.code != 0:
        assert res.code in (1, 2), res.err[-3000:]
        assert len(res.error_lines) == 1 and res.err_lines[-1] == res.error_lines[0]
        assert len(res.error_lines[0]) < 400, f"error line too long: {res.error_lines[0][:600]}"


@pytest.mark.parametrize(
    "victim",
    ["optimizer.pt", pytest.param("rng_state.pth", marks=pytest.mark.slow),
     pytest.param("scheduler.pt", marks=pytest.mark.slow)],
)  # fmt: skip
def test_malicious_pickle_in_a_marked_checkpoint_never_runs(
    victim: str, tmp_path: Path, mini_run: Path
) -> None:
    run_dir = copy_run(mini_run, tmp_path / "run")
    checkpoint = _interrupt_pre(run_dir)
    marker = tmp_path / "PWNED"
    write_evil_torch_file(checkpoint / victim, marker)
    _remark(checkpoint)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI)
    res = cli("run", recipe, "--run-dir", run_dir)
    _assert_clean_outcome(res, marker)
    if res.code != 0:
        # Refused: the message says which file and what to do.
        line = res.error_lines[0]
        assert victim in line or "checkpoint-8" in line, line
    assert (run_dir / "tok" / "final").is_dir()


@pytest.mark.slow
def test_tampered_checkpoint_without_new_marker_is_ignored(tmp_path: Path, mini_run: Path) -> None:
    """Replacing a file changes its size: the manifest no longer matches, the checkpoint is
    dropped and the older one resumed."""
    run_dir = copy_run(mini_run, tmp_path / "run")
    checkpoint = _interrupt_pre(run_dir)
    marker = tmp_path / "PWNED"
    write_evil_torch_file(checkpoint / "optimizer.pt", marker)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI)
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert not marker.exists()
    assert "ignoring and removing checkpoint-8: optimizer.pt has" in res.err
    assert "[pre] resuming from checkpoint-6" in res.err


@pytest.mark.slow
def test_training_args_pickle_is_never_read(tmp_path: Path, mini_run: Path) -> None:
    run_dir = copy_run(mini_run, tmp_path / "run")
    checkpoint = _interrupt_pre(run_dir)
    marker = tmp_path / "PWNED"
    write_evil_torch_file(checkpoint / "training_args.bin", marker)
    _remark(checkpoint)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI)
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert not marker.exists()
    assert "[pre] resuming from checkpoint-8" in res.err


def _evil_model_dir(tmp_path: Path, mini_run: Path, *, keep_safetensors: bool) -> tuple[Path, Path]:
    model = tmp_path / "evil-model"
    shutil.copytree(mini_run / "pre" / "final", model)
    marker = tmp_path / "PWNED"
    write_evil_torch_file(model / "pytorch_model.bin", marker)
    if not keep_safetensors:
        (model / "model.safetensors").unlink()
    return model, marker


@pytest.mark.parametrize(
    "keep_safetensors",
    [
        pytest.param(True, id="with-safetensors", marks=pytest.mark.slow),
        pytest.param(False, id="bin-only"),
    ],
)
def test_model_weights_only_from_safetensors(
    keep_safetensors: bool, tmp_path: Path, mini_run: Path
) -> None:
    """A local model directory with a pickled pytorch_model.bin: never unpickled. Next to a
    model.safetensors it is ignored; alone it is refused (or loaded without running code)."""
    model, marker = _evil_model_dir(tmp_path, mini_run, keep_safetensors=keep_safetensors)
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        MINI
        + f"  ev:\n    kind: eval\n    models: [{model}]\n"
        + "    data: {builtin: toy/corpus, split: test, max_samples: 4}\n    metrics: [perplexity]\n"
        + f"  ft:\n    kind: finetune\n    task: causal_lm\n    from: {model}\n"
        + "    data: {builtin: toy/translate, max_samples: 8}\n    prompt_column: source\n"
        + "    response_column: target\n    validation_fraction: 0\n    train: {max_steps: 1}\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    _assert_clean_outcome(res, marker)
    if keep_safetensors:
        assert res.code == 0, res.err[-3000:]


# ------------------------------------------------------------------ trust_remote_code

LOADERS = [
    "AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModel",
]  # fmt: skip

REMOTE_STAGES = """\
  wrap:
    kind: tokenizer
    from: tok
  ft:
    kind: finetune
    task: causal_lm
    from: pre
    data: {builtin: toy/translate, max_samples: 8}
    prompt_column: source
    response_column: target
    validation_fraction: 0
    train: {max_steps: 1}
  zs:
    kind: prompt
    method: zero_shot
    from: pre
    template: "{source} ="
  ev:
    kind: eval
    models: [pre, zs]
    data: {builtin: toy/translate, split: test, max_samples: 2}
    metrics: [chrf]
    generation: {max_new_tokens: 2}
  pr:
    kind: predict
    model: ft
    data: {builtin: toy/translate, split: test, max_samples: 2}
    generation: {max_new_tokens: 2}
"""


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record the kwargs of every transformers/peft from_pretrained call made by the stages."""
    import peft
    import transformers

    calls: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str, original: Any) -> Any:
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, dict(kwargs)))
            return original(*args, **kwargs)

        return from_pretrained

    for name in LOADERS:
        cls = getattr(transformers, name)
        monkeypatch.setattr(cls, "from_pretrained", recorder(name, cls.from_pretrained))
    for name in ("PeftModel", "PeftConfig"):
        cls = getattr(peft, name)
        monkeypatch.setattr(cls, "from_pretrained", recorder(name, cls.from_pretrained))
    return calls


def _remote_flags(calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    return [kw["trust_remote_code"] for _, kw in calls if "trust_remote_code" in kw]


def test_trust_remote_code_is_never_passed_unless_asked(
    tmp_path: Path, mini_run: Path, loader_calls: list
) -> None:
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINI + REMOTE_STAGES)
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    names = {n for n, _ in loader_calls}
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"} <= names, names
    assert not any(_remote_flags(loader_calls)), [
        c for c in loader_calls if c[1].get("trust_remote_code")
    ]

    # The recorder does see the flag when a stage asks for it (this test can fail).
    loader_calls.clear()
    res = cli("run", recipe, "--run-dir", run_dir, "stages.pr.trust_remote_code=true")
    assert res.code == 0, res.err[-3000:]
    assert True in _remote_flags(loader_calls)


def test_no_code_path_hardcodes_trust_remote_code_true() -> None:
    offenders = []
    for path in (REPO / "mlsteps").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_no_unsafe_torch_load_in_mlsteps() -> None:
    """Every torch.load in mlsteps passes weights_only=True; no pickle.load(s) anywhere."""
    offenders = []
    for path in (REPO / "mlsteps").rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}")
            if re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert not offenders, offenders


# ------------------------------------------------------------------ names and tags


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/b", "..", ".hidden", "x" * 65])
def test_one_stage_command_name_cannot_escape(name: str, tmp_path: Path) -> None:
    res = cli("tokenizer", "--name", name, "--data", "builtin:toy/corpus", cwd=tmp_path)
    assert res.code == 2, res.err
    assert "one path component" in res.err and "Traceback" not in res.err
    assert list(tmp_path.iterdir()) == []


RESERVED = ["state.json", "metrics.json", "report.md", "env.json", "recipe.yaml"]


@pytest.mark.parametrize(
    "name",
    [
        n if n in ("state.json", "report.md") else pytest.param(n, marks=pytest.mark.slow)
        for n in RESERVED
    ],
)
def test_stage_named_like_a_run_file_is_refused(name: str, tmp_path: Path, mini_run: Path) -> None:
    """A stage directory must never replace or shadow a run-level file."""
    run_dir = copy_run(mini_run, tmp_path / "run")
    before = tree_hashes(run_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        MINI
        + f"  {name}:\n    kind: tokenizer\n    data: {{builtin: toy/corpus, max_samples: 20}}\n"
        "    vocab_size: 300\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 2, f"exit {res.code}: {res.err[-1500:]}"
    assert len(res.err_lines) == 1 and name in res.err, res.err
    assert tree_hashes(run_dir) == before


def test_yaml_tags_refused_in_stage_config_files(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    config = tmp_path / "stage.yaml"
    config.write_text(f"vocab_size: !!python/object/apply:os.system ['touch {marker}']\n")
    res = cli("tokenizer", "--config", config, "--data", "builtin:toy/corpus", cwd=tmp_path)
    assert res.code == 2 and "not allowed" in res.err and "Traceback" not in res.err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.yaml"]


JINJA_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
]


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(JINJA_ESCAPES[0], id="subclasses", marks=pytest.mark.slow),
        pytest.param(JINJA_ESCAPES[1], id="cycler-globals"),
        pytest.param(JINJA_ESCAPES[2], id="self-globals", marks=pytest.mark.slow),
    ],
)
def test_jinja_templates_are_sandboxed(template: str, tmp_path: Path, mini_run: Path) -> None:
    marker = tmp_path / "MARKER"
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    text = template.replace("MARKER", str(marker)).replace("'", "''")
    recipe.write_text(
        MINI + "  fs:\n    kind: prompt\n    method: few_shot\n    from: pre\n    shots: 1\n"
        "    data: {builtin: toy/translate, max_samples: 4}\n"
        f"    template: '{text} {{{{ source }}}}'\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    assert not marker.exists(), "a template executed code"
    assert "Traceback" not in res.err
    assert res.code == 2, res.err[-2000:]
    assert len(res.error_lines) == 1 and "stages.fs" in res.error_lines[0], res.err[-2000:]
