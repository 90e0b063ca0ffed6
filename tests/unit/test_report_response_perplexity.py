"""The stage ladder says which perplexity each perplexity column is (report.md and terminal)."""

from __future__ import annotations

import json
from pathlib import Path

from mlsteps.report import build_report, print_report

TIMES = {"started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:09+00:00"}


def _run_dir(tmp_path: Path, ladder: dict) -> Path:
    (tmp_path / "state.json").write_text(
        json.dumps({"name": "r", "stages": {"ev": {"kind": "eval", "status": "done", **TIMES}}})
    )
    (tmp_path / "metrics.json").write_text(json.dumps({"ev": ladder}))
    return tmp_path


def test_ladder_explains_both_perplexities_and_marks_the_lowest(tmp_path: Path, capsys) -> None:
    conv = "response perplexity of the reference given the model's SFT template"
    ladder = {
        "zero_shot": {"perplexity": 48.2, "response_perplexity": 60.5, "bleu": 0.1},
        "translate": {"perplexity": 428.8, "response_perplexity": 3.25, "bleu": 48.4},
    }
    for row in ladder.values():
        row["response_perplexity_convention"] = conv
    text = build_report(_run_dir(tmp_path, ladder), plots=False)
    assert "| translate | 428.80 | **3.25** | **48.40** |" in text  # lower is better
    assert "perplexity = of the text column as bare text" in text
    assert "response_perplexity = of the reference given each model's own prompt" in text
    assert f"`response_perplexity_convention = {conv}`" in text
    print_report(tmp_path)
    shown = capsys.readouterr().out
    assert "resp ppl" in shown and "resp ppl = of the reference given each model's own" in shown


def test_no_legend_without_perplexity_columns(tmp_path: Path) -> None:
    text = build_report(_run_dir(tmp_path, {"a": {"bleu": 1.0}, "b": {"bleu": 2.0}}), plots=False)
    assert "Perplexity:" not in text
