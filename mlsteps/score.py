"""``mlsteps score``: score generations made elsewhere with the eval stage's metric code.

PREDICTIONS is a ``.jsonl`` file (the ``prediction`` field of each line, as ``predictions.jsonl``
of predict/eval stages writes it, or ``--prediction-field``) or plain text, one output per line.
Each ``--references FILE`` gives one reference per row (jsonl: its ``reference`` field, a string
or a list of strings; text: one per line); several files give several references per row.
Metrics: bleu, chrf, ter, rouge, exact_match, token_f1 (the eval stage's functions, same
signatures and conventions) and accuracy, f1 (predictions compared with the references as labels).
No torch import: only sacrebleu / rouge-score as the metrics need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlsteps.errors import UserError, did_you_mean, field_scope
from mlsteps.metrics.generated import LABEL_METRICS, TEXT_METRICS


def read_column(path: Path, field: str, *, what: str) -> list[Any]:
    """Rows of ``path``: ``field`` of each jsonl object, else each line of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the {what} file: {exc}", where=str(path)) from None
    lines = text.splitlines()
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return lines
    out: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError("line is not JSON", where=f"{path}:{number}") from None
        if not isinstance(record, dict) or field not in record:
            raise UserError(
                f"no '{field}' field",
                where=f"{path}:{number}",
                hint=f"name the field with --{what.rstrip('s')}-field",
            )
        out.append(record[field])
    return out


def check_metrics(metrics: list[str]) -> list[str]:
    """The metric names, checked (exit 2 with a suggestion for a misspelled one)."""
    known = TEXT_METRICS + LABEL_METRICS
    names = [m.strip() for item in metrics for m in item.split(",") if m.strip()]
    if not names:
        raise UserError("no metrics given", where="--metrics", hint=f"one of {', '.join(known)}")
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known) or f"one of {', '.join(known)}"
            raise UserError(f"unknown metric '{name}'", where="--metrics", hint=hint)
    return list(dict.fromkeys(names))


def score(
    predictions: list[Any],
    references: list[Any],
    metrics: list[str],
    *,
    target_lang: str | None = None,
) -> dict[str, Any]:
    """The eval stage's scores of ``predictions`` against ``references`` (per row a string or a
    list of strings). Mismatched counts and empty inputs are errors, as in the eval stage."""
    from mlsteps.metrics.generated import score_labels, score_texts

    out: dict[str, Any] = {"rows": len(predictions)}
    texts = [m for m in metrics if m in TEXT_METRICS]
    out.update(score_texts(predictions, references, texts, target_lang=target_lang))
    # Labels: one reference per row (a list of one, from several files of one each, is unwrapped).
    labels = [r[0] if isinstance(r, list) and len(r) == 1 else r for r in references]
    wanted = [m for m in LABEL_METRICS if m in metrics]
    out.update(score_labels(predictions, labels, wanted))
    return out


def score_files(
    predictions: Path,
    references: list[Path],
    metrics: list[str],
    *,
    target_lang: str | None = None,
    prediction_field: str = "prediction",
    reference_field: str = "reference",
) -> dict[str, Any]:
    """Read the files, check the metric names, score."""
    names = check_metrics(metrics)
    if not references:
        raise UserError("no references given", where="--references", hint="--references FILE")
    preds = read_column(predictions, prediction_field, what="predictions")
    columns = [read_column(p, reference_field, what="references") for p in references]
    for path, column in zip(references, columns, strict=True):
        if len(column) != len(preds):
            raise UserError(
                f"{len(preds)} predictions but {len(column)} references",
                where=str(path),
                hint="give one reference per prediction, in the same order",
            )
    if len(columns) == 1:
        refs = columns[0]
    else:  # one file per reference: row i's references are line i of every file
        refs = [[r for col in columns for r in (col[i] if isinstance(col[i], list) else [col[i]])]
                for i in range(len(preds))]  # fmt: skip
    # What the metrics refuse is in the rows scored: their errors name the predictions file.
    with field_scope(str(predictions)):
        return score(preds, refs, names, target_lang=target_lang)
