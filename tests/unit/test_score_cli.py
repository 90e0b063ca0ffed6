"""`mlsteps score`: generations made elsewhere, scored by the eval stage's metric code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlsteps.metrics import classification, text
from tests.unit.test_cli import _imported_after

HYPS = ["the cat sat on the mat today", "a dog ran in the big park", "我们 今天 去 公园"]
REFS_A = ["the cat sat on the mat today", "the dog ran in the park", "我们今天去公园"]
REFS_B = ["a cat was sitting on the mat", "a dog ran in the big park", "今天我们去公园"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlsteps", "score", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _write(path: Path, rows: list[object], field: str | None = None) -> Path:
    if field is None:
        path.write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")
    else:
        lines = [json.dumps({"index": i, field: r}, ensure_ascii=False) for i, r in enumerate(rows)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_scores_equal_the_eval_stage_functions_with_two_references(tmp_path: Path) -> None:
    preds = _write(tmp_path / "predictions.jsonl", HYPS, "prediction")  # predict's format
    a = _write(tmp_path / "a.txt", REFS_A)
    b = _write(tmp_path / "b.jsonl", REFS_B, "reference")
    done = _run(
        [str(preds), "--references", str(a), "--references", str(b),
         "--metrics", "bleu,chrf,ter", "--metrics", "exact_match", "--json"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    refs = [[x, y] for x, y in zip(REFS_A, REFS_B, strict=True)]
    want = {**text.bleu(HYPS, refs), **text.chrf(HYPS, refs), **text.ter(HYPS, refs)}
    want["exact_match"] = classification.exact_match(HYPS, refs)
    for key, value in want.items():
        assert got[key] == value, key
    assert got["bleu_signature"].startswith("nrefs:2|")
    assert got["rows"] == 3


def test_one_reference_list_per_row_in_jsonl(tmp_path: Path) -> None:
    preds = _write(tmp_path / "p.txt", HYPS)
    refs = _write(tmp_path / "r.jsonl", [[x, y] for x, y in zip(REFS_A, REFS_B, strict=True)],
                  "reference")  # fmt: skip
    done = _run([str(preds), "--references", str(refs), "--metrics", "chrf", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chrf_signature"].startswith("nrefs:2|")


def test_labels(tmp_path: Path) -> None:
    preds = _write(tmp_path / "p.txt", ["pos", "neg", "pos", "neg"])
    gold = _write(tmp_path / "g.txt", ["pos", "pos", "pos", "neg"])
    done = _run([str(preds), "--references", str(gold), "--metrics", "accuracy,f1", "--json"],
                tmp_path)  # fmt: skip
    got = json.loads(done.stdout)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["f1"] == pytest.approx(classification.macro_f1(
        ["pos", "neg", "pos", "neg"], ["pos", "pos", "pos", "neg"]))  # fmt: skip


@pytest.mark.parametrize(
    ("refs", "metrics", "message"),
    [
        (["one", "two"], "bleu", "3 predictions but 2 references"),
        (REFS_A, "blue", "did you mean 'bleu'"),
    ],
)
def test_bad_input_is_exit_2(tmp_path: Path, refs: list[str], metrics: str, message: str) -> None:
    preds = _write(tmp_path / "p.txt", HYPS)
    ref_file = _write(tmp_path / "r.txt", refs)
    done = _run([str(preds), "--references", str(ref_file), "--metrics", metrics], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_missing_field_names_the_line(tmp_path: Path) -> None:
    preds = _write(tmp_path / "p.jsonl", HYPS, "output")
    ref_file = _write(tmp_path / "r.txt", REFS_A)
    done = _run([str(preds), "--references", str(ref_file), "--metrics", "bleu"], tmp_path)
    assert done.returncode == 2
    assert "p.jsonl:1" in done.stderr and "--prediction-field" in done.stderr


def test_score_imports_no_torch(tmp_path: Path) -> None:
    preds = _write(tmp_path / "p.txt", HYPS)
    ref_file = _write(tmp_path / "r.txt", REFS_A)
    heavy = _imported_after(
        ["score", str(preds), "--references", str(ref_file), "--metrics", "chrf"]
    )
    assert "torch" not in heavy and "transformers" not in heavy
