"""The ``validation`` field: one data source (pretrain: a list of sources, ValidationSources;
the row-based stages finetune, prompt, preference: one source, ValidationRows), or several named
sets, each evaluated on its own and logged as ``val_<name>_<metric>``. And the fields that do
nothing when a stage has no validation rows."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, StringConstraints, Tag

from mlsteps.recipe.specs.base import Unused
from mlsteps.recipe.specs.data import DataSources, DataSpec

# Named validation sets (``validation: {web: a.txt, books: b.txt}``): each is evaluated on its
# own and logged as val_<name>_<metric>. The name becomes part of metric names: keep it plain.
SetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")]
NamedValidation = Annotated[dict[SetName, DataSources], Field(min_length=1)]


def _validation_form(value: Any) -> str:
    """Named sets: a mapping whose keys are not DataSpec fields, nor near misses of one (a
    misspelled 'filez' gets "unknown key, did you mean 'files'" rather than a set 'filez')."""
    import difflib

    if isinstance(value, dict):
        fields = list(DataSpec.model_fields)
        if not any(k in fields or difflib.get_close_matches(str(k), fields, 1, 0.8) for k in value):
            return "form[named]"
    return "form[one]"


# A ``validation`` field: one source, a list evaluated together, or named sets. The
# form is decided up front so that an error inside a named set is reported there (a plain union
# would report the first form's complaint: "unknown key '<set name>'").
ValidationSources = Annotated[
    # Tags with brackets: error places leave them out like other pydantic internals.
    Annotated[DataSources, Tag("form[one]")] | Annotated[NamedValidation, Tag("form[named]")],
    Discriminator(_validation_form),
]

NamedRows = Annotated[dict[SetName, DataSpec], Field(min_length=1)]

# Decided up front, as for pretrain's ValidationSources: a misspelled DataSpec key stays a
# "did you mean" error, and an error inside a named set is reported at that set.
ValidationRows = Annotated[
    Annotated[DataSpec, Tag("form[one]")] | Annotated[NamedRows, Tag("form[named]")],
    Discriminator(_validation_form),
]

VALIDATION_NAMED = (
    "; or a mapping name -> source, e.g. {dev: dev.jsonl, test: test.jsonl}: each set is "
    "evaluated on its own and logged as val_<name>_<metric> (val_dev_loss, ...)"
)


def unused_without_validation(spec: Any, names: tuple[str, ...] = ()) -> list[Unused]:
    """Fields of a training stage (and its ``train.eval_every_steps``) that do nothing when it
    has no validation rows: no ``validation`` and ``validation_fraction: 0``."""
    if spec.validation is not None or spec.validation_fraction > 0:
        return []
    why = "there are no validation rows (no 'validation', validation_fraction 0)"
    found: list[Unused] = spec._unused(names, why)
    train_fields = ("eval_every_steps", "keep_best", "early_stopping")
    found += [(f"train.{k}", w, f) for k, w, f in spec.train._unused(train_fields, why)]
    return found
