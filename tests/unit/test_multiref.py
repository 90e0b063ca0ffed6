"""Several reference columns for one input (issue 15): `reference_column: [summary1, summary2,
summary3]`. BLEU/chrF/TER equal the sacrebleu command-line tool given one -r file per column;
ROUGE equals an independent per-reference computation (rouge-score's plain `score` for each
reference, the best F-measure per example and type, as `score_multi` does), meaned over
examples. Real data: SciTLDR dev, the papers with at least three reference summaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from pydantic import ValidationError
from rouge_score import rouge_scorer

from mlsteps.errors import UserError
from mlsteps.metrics import text
from mlsteps.recipe.specs.evaluate import EvalSpec
from mlsteps.stages.eval import _require_references

# The sacrebleu CLI comparison is the one tests/unit/test_text_metrics.py uses.
from tests.unit.test_text_metrics import _cli

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COLUMNS = ["summary1", "summary2", "summary3"]


@pytest.fixture(scope="module")
def papers() -> datasets.Dataset:
    lines = (DATA / "scitldr" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows = [r for r in rows if len(r["target"]) >= 3][:60]

    def one_line(s: str) -> str:  # the CLI reads one segment per line
        return " ".join(s.split())

    return datasets.Dataset.from_list(
        [
            {
                "lead1": one_line(r["source"][0]),  # the lead-1 baseline as the system output
                **{c: one_line(r["target"][k]) for k, c in enumerate(COLUMNS)},
            }
            for r in rows
        ]
    )


def test_spec_takes_one_or_several_columns() -> None:
    base = {"kind": "eval", "models": ["m"], "data": "x.jsonl", "metrics": ["bleu"]}
    assert EvalSpec.model_validate(base).reference_column == "target"
    spec = EvalSpec.model_validate({**base, "reference_column": COLUMNS})
    assert spec.reference_column == COLUMNS
    for bad in ([], ["a", "a"]):
        with pytest.raises(ValidationError):
            EvalSpec.model_validate({**base, "reference_column": bad})


def test_columns_join_into_one_list_per_row(papers: datasets.Dataset) -> None:
    refs = _require_references(papers, COLUMNS)
    assert refs[0] == [papers[0][c] for c in COLUMNS]
    # Null cells are skipped: rows may have fewer references; a row with none is an error.
    ds = datasets.Dataset.from_list([{"a": "x y", "b": None}, {"a": "z", "b": "w"}])
    assert _require_references(ds, ["a", "b"]) == [["x y"], ["z", "w"]]
    empty = datasets.Dataset.from_list([{"a": "x", "b": "y"}, {"a": None, "b": ""}])
    with pytest.raises(UserError, match="columns 'a', 'b' row 1 is empty"):
        _require_references(empty, ["a", "b"])


def test_bleu_chrf_ter_equal_sacrebleu_cli_with_one_file_per_column(
    tmp_path: Path, papers: datasets.Dataset
) -> None:
    hyps = papers["lead1"]
    refs = _require_references(papers, COLUMNS)
    cli = _cli(tmp_path, hyps, [papers[c] for c in COLUMNS], "-m", "bleu", "chrf", "ter")
    ours = {**text.bleu(hyps, refs), **text.chrf(hyps, refs), **text.ter(hyps, refs)}
    assert 2 < ours["bleu"] < 60  # a real, non-degenerate score
    for name, key in (("bleu", "BLEU"), ("chrf", "chrF"), ("ter", "TER")):
        assert ours[name] == pytest.approx(cli[key]["score"], abs=1e-5), name
        assert ours[f"{name}_signature"] == cli[key]["signature"], name
    assert ours["bleu_signature"].startswith("nrefs:3|")
    # Three references can only help BLEU against the first alone.
    assert ours["bleu"] > text.bleu(hyps, papers["summary1"])["bleu"]


def test_rouge_is_the_best_reference_per_example(papers: datasets.Dataset) -> None:
    hyps = papers["lead1"]
    refs = _require_references(papers, COLUMNS)
    ours = text.rouge(hyps, refs, target_lang="en")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    for hyp, row in zip(hyps, refs, strict=True):
        per_ref = [scorer.score(ref, hyp) for ref in row]  # rouge-score: score(target, prediction)
        for key in expected:
            expected[key] += max(s[key].fmeasure for s in per_ref)
    for key, total in expected.items():
        assert ours[key] == pytest.approx(total / len(hyps), rel=1e-12), key
    assert "best of refs" in ours["rouge_convention"]
    # The best of three is at least the first alone, and strictly better somewhere.
    first = text.rouge(hyps, papers["summary1"], target_lang="en")
    assert ours["rouge1"] > first["rouge1"]
