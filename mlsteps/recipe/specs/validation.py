"""The ``validation`` field of stages that validate on rows (finetune, prompt, preference):
one data source, or several named sets, each evaluated on its own and logged as
``val_<name>_<metric>`` (pretrain's text form, a list of sources per set, is in common.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Discriminator, Field, Tag

from mlsteps.recipe.specs.common import DataSpec, SetName, _validation_form

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
