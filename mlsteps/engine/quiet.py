"""Quiet by default: transformers messages that are noise in an mlsteps log (``--debug`` keeps
them; the CLI sets ``MLSTEPS_DEBUG`` for that).

- the ``LOAD REPORT`` table of ``from_pretrained``: it lists weights that are expected to be
  absent, such as ``lm_head.weight`` of a model whose output head is tied to its embeddings, and
  a new task head, which the stage's own log line already names;
- "Token indices sequence length is longer than ... will result in indexing errors": mlsteps
  tokenizes whole documents on purpose and windows or packs them to the model's length before
  any of them reaches the model.
"""

from __future__ import annotations

import logging
import os

_NOISE = ("LOAD REPORT", "will result in indexing errors")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


def install() -> None:
    """Filter the noise on transformers' log handlers (records from every transformers module
    pass through them), unless ``MLSTEPS_DEBUG`` is set."""
    if os.environ.get("MLSTEPS_DEBUG"):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # creates transformers' default handler if not there yet
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
