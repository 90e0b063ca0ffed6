"""The one metric table (mlsteps/metrics/table.py) drives validation, the eval stage's dispatch,
`mlsteps score` and the report's best marks and 0-100 scale."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlsteps.metrics import table


def test_every_metric_is_declared_once_with_a_compute_function() -> None:
    assert len(table.NAMES) == len(set(table.NAMES))
    keys = [c.key for m in table.TABLE for c in m.columns]
    assert len(keys) == len(set(keys)), "two metrics write the same ladder column"
    for metric in table.TABLE:
        assert metric.family in table.FAMILIES
        assert metric.kinds, metric.name
        assert callable(table.compute_function(metric.name)), metric.compute
        assert metric.name in {c.key for c in metric.columns} or metric.name == "rouge"


def test_validation_reads_the_table() -> None:
    from mlsteps.recipe.specs import evaluate

    assert evaluate.METRICS == table.NAMES
    for kind, names in evaluate.FITS.items():
        assert names == {m.name for m in table.TABLE if kind in m.kinds}
    assert evaluate.LABELS == table.family("labels") == {"accuracy", "f1"}
    assert evaluate.LANGUAGE == {"bleu", "ter", "rouge"}
    # A masked LM fits only the masked family, a classifier only labels.
    assert table.fitting("mlm") == {"masked_perplexity", "pseudo_perplexity"}
    assert table.fitting("classification") == {"accuracy", "f1"}


def test_score_cli_knows_exactly_the_generation_and_label_metrics() -> None:
    from mlsteps.score import check_metrics

    expected = [m.name for m in table.TABLE if m.family in ("generation", "labels")]
    assert sorted(check_metrics([",".join(expected)])) == sorted(expected)
    from mlsteps.errors import UserError

    with pytest.raises(UserError, match="unknown metric 'perplexity'"):
        check_metrics(["perplexity"])  # needs a model: not scorable from text files


def test_directions_and_scales_come_from_the_table() -> None:
    from mlsteps.report import HIGHER_IS_BETTER, LOWER_IS_BETTER
    from mlsteps.report.text import PERCENT_SCALED

    assert {"bleu", "chrf", "rougeL", "accuracy", "macro_f1"} <= HIGHER_IS_BETTER
    assert {"perplexity", "ter", "bits_per_byte", "response_perplexity"} <= LOWER_IS_BETTER
    assert not HIGHER_IS_BETTER & LOWER_IS_BETTER
    assert "preference_pairs" not in HIGHER_IS_BETTER | LOWER_IS_BETTER  # a count
    assert "bleu" not in PERCENT_SCALED and "ter" not in PERCENT_SCALED  # sacrebleu's 0-100
    assert {"rouge1", "accuracy", "exact_match", "preference_accuracy"} <= PERCENT_SCALED


def test_best_preference_accuracy_is_marked() -> None:
    """Silent bug before the table: preference_accuracy had no direction in the report, so the
    better model of a preference ladder was never marked."""
    from mlsteps.report import best_cells, ladder_rows

    ladder = {
        "sft": {"preference_accuracy": 0.5, "preference_accuracy_normalized": 0.4},
        "dpo": {"preference_accuracy": 0.75, "preference_accuracy_normalized": 0.6},
    }
    header, _rows, _notes = ladder_rows(ladder)
    best = best_cells(ladder, header)
    assert (1, header.index("preference_accuracy")) in best
    assert (1, header.index("preference_accuracy_normalized")) in best
    assert (0, header.index("preference_accuracy")) not in best


def test_lm_eval_columns_keep_their_own_names_and_scale() -> None:
    from mlsteps.report import best_cells, ladder_rows

    ladder = {
        "a": {"hellaswag/acc,none": 0.25, "perplexity": 12.0},
        "b": {"hellaswag/acc,none": 0.5, "perplexity": 10.0},
    }
    header, rows, notes = ladder_rows(ladder)
    cells = dict(zip(header, rows[1], strict=True))
    assert cells["hellaswag/acc,none"] == "0.5"  # not rescaled to 0-100
    assert table.better("hellaswag/acc,none") is None
    best = best_cells(ladder, header)
    assert (1, header.index("perplexity")) in best
    assert not any(col == header.index("hellaswag/acc,none") for _, col in best)
    assert any("lm-eval" in n for n in notes)


def test_text_and_label_dispatch_matches_the_metric_functions() -> None:
    from mlsteps.metrics import classification
    from mlsteps.metrics.generated import score_labels, score_texts

    preds, refs = ["the cat sat", "a big dog"], ["the cat sat", "the dog"]
    out = score_texts(preds, refs, ["exact_match", "token_f1"], target_lang=None)
    assert out["exact_match"] == classification.exact_match(preds, refs) == 0.5
    assert out["token_f1"] == classification.token_f1(preds, refs)
    labels = score_labels(["a", "b", "b"], ["a", "b", "a"], ["accuracy", "f1"])
    assert labels["accuracy"] == pytest.approx(2 / 3)
    assert labels["f1"] == classification.macro_f1(["a", "b", "b"], ["a", "b", "a"])
    with pytest.raises(ValueError, match="not a text metric"):
        score_texts(preds, refs, ["perplexity"], target_lang=None)


def test_the_table_and_validation_stay_torch_free() -> None:
    code = (
        "import sys, mlsteps.metrics.table, mlsteps.recipe.specs.evaluate, mlsteps.score;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
