"""Conversations and chat templates: one place that reads ``messages`` cells and picks the
template, shared by the finetune (task: chat), preference and eval stages.

A conversation is a list of ``{role, content}`` mappings (the HF/OpenAI convention); ShareGPT's
``{from, value}`` turns are accepted and converted (``human`` -> ``user``, ``gpt`` ->
``assistant``). The template is the tokenizer's ``chat_template`` (a Jinja string), so that
``tokenizer.apply_chat_template``, ``transformers.pipeline``, vLLM and lm-eval reproduce the
training prompt from the saved ``final/`` tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlsteps.errors import HERE, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ChatML (the format of Qwen and many open chat models). The generation prompt opens an
# assistant turn; every turn ends with <|im_end|> and a newline. No BOS: byte-level BPE
# tokenizers of small models have none, and templates that add one double it on re-tokenising.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
# Tokens a builtin template needs as single special tokens (added to the tokenizer if missing).
TEMPLATE_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"]}
# The token that ends an assistant turn: generation stops on it.
TURN_END = {"chatml": "<|im_end|>"}

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_call": "assistant",
                   "observation": "tool"}  # fmt: skip


def is_conversation(value: Any) -> bool:
    """Whether a cell holds a conversation (a non-empty list of mappings)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def normalize_messages(value: Any, *, row: int, column: str) -> list[dict[str, str]]:
    """A conversation cell as ``[{role, content}, ...]``; UserError naming the row otherwise."""
    if not is_conversation(value):
        kind = type(value).__name__
        raise UserError(
            f"column '{column}' row {row} is {kind}, expected a conversation (a list of "
            "{role, content} turns)",
            field=HERE,
            hint='write e.g. [{"role": "user", "content": "..."}, {"role": "assistant", ...}]',
        )
    out = []
    for i, turn in enumerate(value):
        if "role" in turn and "content" in turn:
            role, content = turn["role"], turn["content"]
        elif "from" in turn and "value" in turn:  # ShareGPT
            role, content = _SHAREGPT_ROLES.get(str(turn["from"]), turn["from"]), turn["value"]
        else:
            raise UserError(
                f"column '{column}' row {row} turn {i} has keys {sorted(turn)}, expected "
                "role/content (or ShareGPT from/value)",
                field=HERE,
            )
        if role not in ROLES or not isinstance(content, str):
            raise UserError(
                f"column '{column}' row {row} turn {i}: role {role!r} with "
                f"{type(content).__name__} content; expected a role of {', '.join(ROLES)} and "
                "text content",
                field=HERE,
            )
        out.append({"role": str(role), "content": content})
    return out


def resolve_template(value: str) -> str:
    """A builtin template name (``chatml``) or a Jinja string -> the Jinja string."""
    return BUILTIN_TEMPLATES.get(value, value)


def check_template_text(value: str) -> None:
    """ValueError unless ``value`` is a builtin name or a Jinja template that renders messages
    (pure Python: jinja2 only, so `validate` can call it)."""
    if value in BUILTIN_TEMPLATES:
        return
    if "{{" not in value and "{%" not in value:
        raise ValueError(
            f"chat_template {value[:40]!r} is neither a builtin name "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template"
        )
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"chat_template is not valid Jinja: {exc.message} (line {exc.lineno})"
        ) from None


def set_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    """Install ``chat_template`` (name or Jinja) on ``tokenizer``; with None keep the tokenizer's
    own and fail when it has none. Builtin templates add their turn tokens as special tokens
    (the caller resizes the model's embeddings when ``len(tokenizer)`` grew)."""
    if chat_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat template, and conversations need one",
                field=HERE,
                hint="set chat_template: chatml (or a Jinja template string)",
            )
        return
    tokens = TEMPLATE_TOKENS.get(chat_template, [])
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = resolve_template(chat_template)


class ChatText(str):
    """Text rendered by a chat template. It already holds every special token the template
    writes (a BOS included, when the template has one), so it is tokenised without the
    tokenizer's own special tokens, as ``apply_chat_template(tokenize=True)`` does; tokenising
    it like plain text would add a second BOS for tokenizers that add one (Llama and friends)."""

    __slots__ = ()


def special_tokens_for(text: str) -> bool:
    """``add_special_tokens`` for a model input: False for template-rendered text."""
    return not isinstance(text, ChatText)


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> ChatText:
    """The template's text of ``messages`` (what ``apply_chat_template(tokenize=False)`` gives)."""
    return ChatText(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def prompt_messages(demos: list[tuple[str, str]], query: str) -> list[dict[str, str]]:
    """A hard prompt as chat turns: every (prompt, answer) demonstration an earlier user turn and
    its assistant reply, then the row's prompt as the last user turn."""
    turns = []
    for prompt, answer in demos:
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return [*turns, {"role": "user", "content": query}]


def template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> list[int]:
    """Token ids of the rendered conversation, tokenised as apply_chat_template does (no extra
    special tokens: the template writes its own)."""
    text = render(tokenizer, messages, generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_last_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """(the turns before a final assistant turn, its text); (all turns, None) without one."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def generation_input(
    tokenizer: PreTrainedTokenizerBase, value: Any, *, row: int, column: str
) -> str:
    """What a chat model is given to answer: text stays as is; a conversation is rendered by the
    tokenizer's template up to (without) its final assistant turn, with the generation prompt."""
    if not is_conversation(value):
        return str(value)
    messages = normalize_messages(value, row=row, column=column)
    set_template(tokenizer, None)  # fails clearly when the model has no template
    prompt, _ = split_last_answer(messages)
    return render(tokenizer, prompt, generation_prompt=True)


def reference_of(value: Any) -> Any:
    """A reference cell: a conversation gives the text of its final assistant turn."""
    if is_conversation(value):
        last = value[-1]
        role = _SHAREGPT_ROLES.get(str(last.get("role", last.get("from"))), "")
        if role == "assistant":
            return last.get("content", last.get("value"))
    return value


def split_pair(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Whole conversations (the format of trl-lib/ultrafeedback_binarized: no prompt column)
    -> (their shared turns = the prompt, chosen's remaining turns, rejected's remaining turns)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids two renderings share: where a template's answer starts (chat
    SFT labels, preference_accuracy's answer tokens)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
