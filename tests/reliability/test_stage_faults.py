"""Runtime faults of single stages found while building the suite (each test names its bug in
/tmp/reliability-bugs.md / docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from relkit import MINI, cli, copy_run, read_json

SHORT_MODEL_SOFT_PROMPT = """\
  pre64:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 64}
    data: {builtin: toy/corpus, max_samples: 60}
    validation_fraction: 0
    max_seq_len: 32
    train: {max_steps: 2}
  soft64:
    kind: prompt
    method: prompt_tuning
    from: pre64
    data: {builtin: toy/translate, max_samples: 16}
    validation_fraction: 0
    template: "{source} ="
    num_virtual_tokens: 4
    preview_rows: 2
    train: {max_steps: 2, lr: 3.0e-2}
"""


@pytest.mark.slow
def test_soft_prompt_on_a_short_model_does_not_crash(tmp_path: Path, mini_run: Path) -> None:
    """B3: virtual tokens + prompt + generated tokens must fit the model's 64 positions."""
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINI + SHORT_MODEL_SOFT_PROMPT)
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.error_lines or res.err[-3000:]
    assert (run_dir / "soft64" / "final").is_dir()
    assert read_json(run_dir / "state.json")["stages"]["soft64"]["status"] == "done"
