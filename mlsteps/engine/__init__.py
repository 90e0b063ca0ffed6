"""Heavy shared ML code (torch/transformers); imported only by stages.

Importing it also silences library messages that are known to be harmless here and only bury
the progress lines (each is named below, with why it does not apply).
"""

from __future__ import annotations

import warnings

# peft drops position_ids for prompt/p-tuning; prompt.soft_prompt decodes without padding so
# positions stay right (see its docstring).
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient")
# peft 0.21 calls a transformers 5 property that transformers has renamed; nothing to do on our side.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

# transformers' load-report tables and its "indexing errors" warning (see engine.quiet).
from mlsteps.engine import quiet as _quiet  # noqa: E402

_quiet.install()
