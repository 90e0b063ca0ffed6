"""The recipe shown in the README runs as shown (shortened by overrides), so the front page
never advertises a recipe that fails."""

from __future__ import annotations

import re
from pathlib import Path

from mlsteps.recipe import load_recipe
from mlsteps.rundir import read_json

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_recipe() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## A recipe") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "README has no yaml block under '## A recipe'"
    return match.group(1)


def test_readme_recipe_runs(tmp_path: Path) -> None:
    import torch

    from mlsteps.runner import run_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(readme_recipe(), encoding="utf-8")
    short = [
        "stages.tok.vocab_size=400",
        "stages.pretrain.train.max_steps=3",
        "stages.sft.train.max_steps=3",
        "stages.sft.validation_fraction=0",
        "stages.ev.data.max_samples=4",
    ]
    recipe = load_recipe(path, short)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_recipe(recipe, tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0
    ladder = read_json(tmp_path / "run" / "metrics.json")["ev"]
    assert list(ladder) == ["pretrain", "sft"]
    assert all({"bleu", "chrf"} <= set(row) for row in ladder.values())
