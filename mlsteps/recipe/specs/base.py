"""The base of every recipe model and the strict field types they share.

Every model is strict (``extra="forbid"``) and every field carries a description: the
descriptions feed ``mlsteps schema`` and the recipe reference in the README.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import Strict as StrictMode
from pydantic_core import PydanticCustomError

# Numbers are strict: YAML's true/false/yes/no/on/off never count as 1/0, text never counts as a
# number, and a float field refuses inf/nan (libraries fail on them much later, with a traceback
# and exit 1). Ints are capped where torch and numpy stop accepting them.
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's (and transformers.set_seed's) seed range is 0..2**32-1


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number", "expected a number, got the boolean {value}", {"value": value}
        )
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)  # 1e3 is an exact whole number; 2.5 stays a float and is refused
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)  # a numpy integer from code that builds a spec
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number", "expected a number, got the boolean {value}", {"value": value}
        )
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        return float(value)  # a numpy float32 from code that builds a spec
    return value


# A whole number, never a boolean or text; every alias below gives it bounds.
Int = Annotated[int, BeforeValidator(_number), StrictMode()]
# The shared float: finite, never a boolean or text (an int is fine).
FiniteFloat = Annotated[float, BeforeValidator(_not_bool), StrictMode(), Field(allow_inf_nan=False)]

PositiveInt = Annotated[Int, Field(gt=0, le=INT64_MAX)]
NonNegativeInt = Annotated[Int, Field(ge=0, le=INT64_MAX)]
Seed = Annotated[Int, Field(ge=0, le=SEED_MAX)]
PositiveFloat = Annotated[FiniteFloat, Field(gt=0)]
NonNegativeFloat = Annotated[FiniteFloat, Field(ge=0)]
Fraction = Annotated[FiniteFloat, Field(ge=0, lt=1)]
Probability = Annotated[FiniteFloat, Field(gt=0, lt=1)]
PositiveFraction = Annotated[FiniteFloat, Field(gt=0, le=1)]
Bool = Annotated[bool, StrictMode()]
# An integer literal (zero_stage) must not take True as 1.
NotBool = BeforeValidator(_not_bool)

# Stage and run names become directory names: keep them to one safe path component.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Stage names also start every override key (stages.NAME.key), which splits on dots: no dots.
STAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


# A field that does nothing: (dotted key as written, why, how to fix).
Unused = tuple[str, str, str]


class Strict(BaseModel):
    """Base for all recipe models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def _unused(self, names: Iterable[str], why: str, fix: str = "remove it") -> list[Unused]:
        """(key, why, fix) for each of ``names`` the input gave (model_fields_set) with a value
        other than the default. A default value changes nothing either way, and a resolved
        recipe (every field written out) must load again."""
        fields = type(self).model_fields
        return [
            (fields[n].alias or n, why, fix)
            for n in names
            if n in self.model_fields_set
            and getattr(self, n) != fields[n].get_default(call_default_factory=True)
        ]

    def _ignored(self) -> list[Unused]:
        """This model's own fields that do nothing under the values of other fields."""
        return []

    def _invalid(self) -> list[Unused]:
        """This model's own fields whose value cannot work given the other fields: (key, what,
        fix). For checks that need a field's place in the recipe, which a model validator's
        error does not name."""
        return []

    def ignored_fields(self) -> list[Unused]:
        """Every given field, here and in nested models, that does nothing: (dotted key as
        written, why, how to fix). The recipe refuses them: a setting that silently has no
        effect is a misread recipe."""
        return self._walk("_ignored")

    def invalid_fields(self) -> list[Unused]:
        """Every field, here and in nested models, whose value cannot work (see _invalid)."""
        return self._walk("_invalid")

    def _walk(self, hook: str) -> list[Unused]:
        found: list[Unused] = getattr(self, hook)()
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            key = type(self).model_fields[name].alias or name
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, Strict):
                    # A single data source is held as a list of one but written without an index.
                    sub = f"{key}.{i}" if len(items) > 1 else key
                    found += [(f"{sub}.{k}", why, fix) for k, why, fix in item._walk(hook)]
        return found
