"""report/text.py: how the report describes a stage's data in words (no torch)."""

from __future__ import annotations

import pytest

from mlsteps.recipe import load_recipe
from mlsteps.report.text import data_text, describe_stage


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


# ---------------------------------------------------------------- one scale, honest loss axes


def test_ladder_shows_every_score_on_0_to_100() -> None:
    from mlsteps.report import best_cells, ladder_rows
    from mlsteps.report.text import LADDER_SCALE_NOTE

    ladder = {
        "a": {"bleu": 48.4, "chrf": 64.7, "rouge1": 0.4523, "rougeL": 0.25, "accuracy": 0.8,
              "f1": 0.755, "exact_match": 0.1, "bleu_signature": "nrefs:1"},
        "b": {"bleu": 45.3, "chrf": 61.8, "rouge1": 0.5, "rougeL": 0.2, "accuracy": 0.9,
              "f1": 0.6, "exact_match": 0.0, "bleu_signature": "nrefs:1"},
    }  # fmt: skip
    header, rows, notes = ladder_rows(ladder)
    cells = dict(zip(header, rows[0], strict=True))
    assert cells["bleu"] == "48.40" and cells["chrf"] == "64.70"  # sacrebleu's own scale
    assert cells["rouge1"] == "45.23" and cells["rougeL"] == "25.00"
    assert cells["accuracy"] == "80.00" and cells["f1"] == "75.50"
    assert cells["exact_match"] == "10.00"
    assert dict(zip(header, rows[1], strict=True))["exact_match"] == "0"
    assert notes[0] == LADDER_SCALE_NOTE and "metrics.json" in notes[0]
    # The best cell is still found on the stored values.
    assert (1, header.index("rouge1")) in best_cells(ladder, header)
    # A ladder of perplexities only has nothing to rescale and no note.
    _, rows, notes = ladder_rows({"a": {"perplexity": 12.5}, "b": {"perplexity": 10.0}})
    assert rows[0][1] == "12.50" and not notes


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        ({"kind": "pretrain", "objective": "clm"}, "loss (nats/token)"),
        ({"kind": "pretrain", "objective": "mlm"}, "loss (nats/masked token)"),
        ({"kind": "finetune", "task": "classification"}, "cross-entropy (nats/example)"),
        ({"kind": "finetune", "task": "classification", "class_weights": True},
         "class-weighted cross-entropy (nats/example)"),
        ({"kind": "finetune", "task": "seq2seq"}, "loss (nats/target token)"),
        ({"kind": "finetune", "task": "causal_lm"}, "loss (nats/response token)"),
        ({"kind": "prompt", "method": "prompt_tuning"}, "loss (nats/answer token)"),
    ],
)  # fmt: skip
def test_loss_axis_label_follows_the_loss(spec: dict, label: str) -> None:
    from mlsteps.report.plots import loss_label

    assert loss_label(spec) == label


def test_report_plots_label_axes_and_compare_only_like_losses(tmp_path, monkeypatch) -> None:
    import json

    import matplotlib.axes
    import yaml

    from mlsteps.report import build_report

    labels: list[str] = []
    real = matplotlib.axes.Axes.set_ylabel

    def spy(self, label, *args, **kwargs):  # record what the real method draws
        labels.append(label)
        return real(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", spy)
    base = {"kind": "finetune", "from": "x", "data": "d.jsonl"}
    stages = {
        "cls_a": {**base, "task": "classification"},
        "cls_b": {**base, "task": "classification"},
        "mt": {**base, "task": "seq2seq"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "stages": stages}))
    state = {n: {"kind": "finetune", "status": "done", "duration_s": 1.0} for n in stages}
    (tmp_path / "state.json").write_text(json.dumps({"name": "r", "stages": state}))
    (tmp_path / "metrics.json").write_text(json.dumps({n: {"loss": 1.0} for n in stages}))
    for n in stages:
        (tmp_path / n).mkdir()
        log = [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)]
        (tmp_path / n / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    report = build_report(tmp_path)
    # One comparison (the two classifiers); the seq2seq stage's per-token loss is not mixed in.
    compared = sorted(p.name for p in tmp_path.glob("compare_*.png"))
    assert len(compared) == 1 and "cross_entropy" in compared[0]
    assert "finetune stages compared (cross-entropy (nats/example))" in report
    assert labels.count("cross-entropy (nats/example)") == 3  # the comparison + 2 stage plots
    assert labels.count("loss (nats/target token)") == 1
    assert "loss (nats/token)" not in labels


def test_preference_accuracy_is_on_the_ladder_scale_too() -> None:
    # The demo's alignment ladder printed 0.84 under a note saying every score is on 0-100.
    from mlsteps.report.text import ladder_value

    assert ladder_value("preference_accuracy", 0.84) == 84.0
    assert ladder_value("preference_accuracy_normalized", 0.5) == 50.0
    assert ladder_value("preference_pairs", 100) == 100
