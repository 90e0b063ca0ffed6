"""Recipe models are built with pydantic's plugin discovery off: the first model built with it
on scans every installed distribution's entry points for pydantic plugins, about a tenth of
`mlsteps validate`'s start-up. Recipe models use no plugin. Each ``off()`` is paired with a
``done()`` that restores the caller's setting, so pydantic users after that see their plugins as
before (typer does the same while it builds its parameter adapters). Importing this module is
the ``off()`` of the spec modules (mlsteps.recipe.specs calls ``done()`` once they are built)."""

from __future__ import annotations

import os

_KEY = "PYDANTIC_DISABLE_PLUGINS"
_saved: list[str | None] = []


def off() -> None:
    """Turn plugin discovery off until the matching ``done()``."""
    _saved.append(os.environ.get(_KEY))
    os.environ[_KEY] = "__all__"


def done() -> None:
    """Restore the setting from before the matching ``off()``."""
    before = _saved.pop()
    if before is None:
        os.environ.pop(_KEY, None)
    else:
        os.environ[_KEY] = before


off()
