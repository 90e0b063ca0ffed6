"""Several named validation sets in one training stage (``validation: {name: data}``).

The one mechanism every training stage uses: each set is loaded and prepared on its own, the
Trainer evaluates a dict of them natively (``eval_<name>_loss`` -> ``val_<name>_loss``), and
extra evaluations (generation, rank classification, token-weighted loss) are combined by
``named_evaluation`` under the same names. The unnamed form keeps the plain ``val_<metric>``
names, so a recipe with one validation source logs exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def data_sets(validation: Any) -> dict[str, Any]:
    """A ``validation`` field as {set name: data}; the single, unnamed form has the name ''."""
    if validation is None:
        return {}
    if isinstance(validation, dict):
        return dict(validation)
    return {"": validation}


def where_of(where: str, name: str) -> str:
    """The recipe place of set ``name`` under ``where`` (``stages.x.validation``)."""
    return f"{where}.{name}" if name else where


def metric_name(key: str, name: str) -> str:
    """``val_<metric>`` of set ``name`` as it is logged: ``val_<name>_<metric>``."""
    return f"val_{name}_{key.removeprefix('val_')}" if name else key


def map_sets(sets: Mapping[str, T], build: Callable[[str, T], Any]) -> dict[str, Any]:
    """``build(name, value)`` for every set, keeping the names."""
    return {name: build(name, value) for name, value in sets.items()}


def trainer_eval_dataset(sets: Mapping[str, Any]) -> Any:
    """What the Trainer's ``eval_dataset`` takes: None, the one unnamed set, or a dict (the
    Trainer prefixes each set's metrics with its name)."""
    if not sets:
        return None
    if list(sets) == [""]:
        return sets[""]
    return dict(sets)


def named_evaluation(evaluators: Mapping[str, Any]) -> Any:
    """One ``extra_eval`` over several validation sets: set ``name``'s ``val_<metric>`` becomes
    ``val_<name>_<metric>`` (the unnamed set, '', keeps ``val_<metric>``)."""
    if not evaluators:
        return None
    if list(evaluators) == [""]:
        return evaluators[""]

    def evaluate(model: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, evaluator in evaluators.items():
            for key, value in evaluator(model).items():
                out[metric_name(key, name)] = value
        return out

    return evaluate
