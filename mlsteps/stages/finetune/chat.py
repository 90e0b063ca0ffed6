"""``finetune`` with ``task: chat``: conversations through the tokenizer's chat template, loss on
assistant turns only.

Each conversation is rendered once by the template and tokenised once. The tokens of assistant
turn k are found by rendering the conversation up to turn k: ``messages[:k]`` with the
generation prompt gives where the answer starts (so the assistant header, e.g.
``<|im_start|>assistant\\n``, is context, not a label), ``messages[:k+1]`` where it ends
(the turn-end token, e.g. ``<|im_end|>``, is a label: the model learns to stop). The prompt of
the last assistant turn is therefore exactly ``apply_chat_template(messages[:-1],
add_generation_prompt=True)``, what ``transformers.pipeline``, vLLM and lm-eval feed the saved
model. System and user turns are masked (label -100).

Packing and dynamic padding are those of causal SFT (``sft.pack_sft``/``SftCollator``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets

from mlsteps.engine import chat_data
from mlsteps.errors import HERE, UserError
from mlsteps.stages.finetune.data import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside assistant turns."""
    ids = chat_data.template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = chat_data.template_ids(tokenizer, messages[:k], generation_prompt=True)
        through = chat_data.template_ids(tokenizer, messages[: k + 1], generation_prompt=False)
        # A template may render a prefix differently (e.g. it drops a trailing header): the
        # answer starts where the renderings first differ, never inside the prompt.
        start = chat_data.common_prefix(before, ids)
        end = chat_data.common_prefix(through, ids)
        if end <= start:
            end = len(through) if through == ids[: len(through)] else start
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_chat(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, column: str, max_seq_len: int
) -> datasets.Dataset:
    """input_ids/attention_mask/labels of every conversation, truncated to ``max_seq_len``
    (keeping the start: the first exchanges). Rows whose assistant tokens all fall beyond the
    cut are dropped, with a count in the error if none remain."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, value in enumerate(ds[column]):
        messages = chat_data.normalize_messages(value, row=i, column=column)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(
                f"column '{column}' row {i} has no assistant turn: nothing to learn",
                field=HERE,
                hint="every conversation needs at least one assistant reply",
            )
        ids, labels = encode_conversation(tokenizer, messages)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(x == IGNORE_INDEX for x in labels):
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    if not out["input_ids"]:
        raise UserError(
            f"every conversation's assistant turns start beyond max_seq_len {max_seq_len}",
            field=HERE,
            hint="raise max_seq_len",
        )
    return datasets.Dataset.from_dict(out)


def generation_pairs(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, column: str
) -> tuple[list[str], list[list[str]]]:
    """Validation by generation: (rendered prompt of the last assistant turn, [its text])."""
    inputs: list[str] = []
    refs: list[list[str]] = []
    for i, value in enumerate(ds[column]):
        messages = chat_data.normalize_messages(value, row=i, column=column)
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        inputs.append(chat_data.render(tokenizer, messages[:last], generation_prompt=True))
        refs.append([messages[last]["content"]])
    return inputs, refs


def use_turn_end_as_eos(
    tokenizer: PreTrainedTokenizerBase, model: Any, chat_template: str | None
) -> None:
    """With a builtin template, its turn-end token becomes the EOS of tokenizer, model config
    and generation config: generation (here, in pipelines, in vLLM) stops at the end of the
    assistant's turn."""
    end = chat_data.TURN_END.get(chat_template or "")
    if end is None:
        return
    tokenizer.eos_token = end
    end_id = tokenizer.convert_tokens_to_ids(end)
    model.config.eos_token_id = end_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = end_id
