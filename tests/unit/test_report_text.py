"""report_text: how the report describes a stage's data in words (no torch)."""

from __future__ import annotations

import pytest

from mlsteps.recipe import load_recipe
from mlsteps.report_text import data_text, describe_stage


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"builtin": "toy/translate", "split": "test", "max_samples": 100},
         "builtin:toy/translate (test, first 100 rows)"),
        ([{"builtin": "toy/corpus", "split": "train"}, {"builtin": "toy/translate", "split": "train"}],
         "builtin:toy/corpus (train) + builtin:toy/translate (train)"),
        ({"files": ["a.tsv"], "shuffle_seed": 7, "rows": "95%:", "max_samples": 100},
         "a.tsv (shuffled with seed 7, rows 95%:, first 100 rows)"),
        ({"files": ["a.txt", "b.txt"], "txt_unit": "paragraph"}, "a.txt, b.txt (one row per paragraph)"),
        ({"files": ["1", "2", "3", "4"]}, "1, 2, 3 (+1)"),
        ({"aligned": {"source": "a.en", "target": "a.de"}}, "aligned source=a.en, target=a.de"),
        ({"hub": "wikitext", "hub_config": "wikitext-2-raw-v1", "split": "test"},
         "hub:wikitext/wikitext-2-raw-v1 (test)"),
    ],
)  # fmt: skip
def test_data_in_words(data: object, words: str) -> None:
    assert data_text(data) == words


def test_the_quickstart_stages_read_as_words() -> None:
    """Every stage of the shipped quickstart is described without raw dicts or reprs."""
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    for spec in recipe.stages.values():
        text = describe_stage(spec.model_dump(mode="json", by_alias=True))
        assert text and "{'" not in text and "None" not in text, text  # no dict reprs
