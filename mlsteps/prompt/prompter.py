"""Hard-prompt machinery shared by the prompt stage and inference: templates, few-shot demos,
and the on-disk "prompted model" format.

Light on purpose (no torch, jinja2 imported lazily): eval/predict load a prompted model through
:func:`load_prompter` and the recipe validator may list template fields without the ML stack.

Prompt layout (the convention every caller relies on)::

    <demo 1 prompt><sep_head><sep_tail><demo 1 answer><demo_separator>...<row prompt><sep_head>

where ``answer_separator = sep_head + sep_tail`` and ``sep_tail`` is its trailing whitespace.
The trailing whitespace belongs to the *answer* side (``Prompter.answer_prefix``): BPE tokenizers
attach a leading space to the following word ("Ġgreat"), so a prompt ending in a bare space would
make the model predict a token it never saw in the demonstrations or in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlsteps import templates
from mlsteps.errors import UserError, did_you_mean
from mlsteps.templates import TemplateFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_FILE = "mlsteps_prompt.json"
# Trained with peft; the hard-prompt methods (zero_shot, few_shot) have no weights of their own.
SOFT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
FORMAT_VERSION = 1
# Contextual calibration (Zhao et al. 2021) averages the label distribution over these inputs.
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def resolve_format(template: str, template_format: str = "auto") -> TemplateFormat:
    """'auto' means Jinja2 when the template contains '{{' or '{%', else format fields."""
    try:
        return templates.resolve_format(template, template_format)
    except templates.TemplateError as exc:
        raise UserError(str(exc), hint=exc.hint) from None


def template_fields(
    template: str, template_format: str = "auto", *, field: str | None = None
) -> list[str]:
    """Column names a template reads, sorted. Syntax errors are UserErrors."""
    try:
        return sorted(templates.template_fields(template, template_format))
    except templates.TemplateError as exc:
        raise UserError(str(exc), field=field, hint=exc.hint) from None


def check_template_columns(
    template: str,
    columns: Iterable[str],
    *,
    template_format: str = "auto",
    field: str | None = None,
) -> list[str]:
    """Raise a UserError naming the existing columns when the template reads a missing one."""
    available = list(columns)
    fields = template_fields(template, template_format, field=field)
    for name in fields:
        if name not in available:
            hint = did_you_mean(name, available)
            raise UserError(
                f"template field '{name}' is not a column; the data has: {', '.join(available) or '(none)'}",
                field=field,
                hint=hint,
            )
    return fields


def render_template(
    template: str,
    row: Mapping[str, Any],
    template_format: str = "auto",
    *,
    field: str | None = None,
) -> str:
    """Render one row. Prefer :class:`Prompter`, which compiles a Jinja2 template only once."""
    return _Renderer(template, resolve_format(template, template_format)).render(row, field=field)


class _Renderer:
    """templates.Renderer with the errors as UserErrors at ``field`` (relative; None: no place)."""

    def __init__(self, template: str, fmt: TemplateFormat):
        self._inner = templates.Renderer(template, fmt)

    def render(self, row: Mapping[str, Any], *, field: str | None = None) -> str:
        try:
            return self._inner.render(row)
        except templates.TemplateError as exc:
            raise UserError(str(exc), field=field, hint=exc.hint) from None


# --------------------------------------------------------------------------------------------
# Few-shot demonstrations
# --------------------------------------------------------------------------------------------


def row_key(row: Mapping[str, Any]) -> str:
    """Stable content hash of a row: seeds per-example demo selection independently of row order."""
    blob = json.dumps(dict(row), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def select_demonstrations(
    pool_size: int, shots: int, seed: int, *, key: str | None = None, exclude: Iterable[int] = ()
) -> list[int]:
    """Pick ``shots`` distinct indices of a pool of ``pool_size`` rows, deterministically.

    The same (seed, key) always gives the same indices, in the same order, in every process
    (``random.Random`` seeded with a string hashes it with SHA-512, not the salted ``hash()``).
    ``key=None`` is the fixed set used for every row; a per-row ``key`` gives per-example demos.
    """
    banned = set(exclude)
    candidates = [i for i in range(pool_size) if i not in banned]
    if shots > len(candidates):
        raise UserError(f"{shots} shots requested but only {len(candidates)} demonstration rows")
    rng = random.Random(f"mlsteps-shots:{seed}:{key or ''}")
    return rng.sample(candidates, shots)


def split_separator(answer_separator: str) -> tuple[str, str]:
    """Split into (prompt side, answer side): trailing whitespace goes to the answer side."""
    head = answer_separator.rstrip()
    return head, answer_separator[len(head) :]


@dataclass(frozen=True)
class Demonstration:
    """One rendered demonstration: the prompt (template applied to a row) and its answer."""

    prompt: str
    answer: str


# --------------------------------------------------------------------------------------------
# The prompted model
# --------------------------------------------------------------------------------------------


@dataclass
class Prompter:
    """Everything needed to turn a data row into model input for a prompted model.

    ``render(row)`` gives the full prompt (demonstrations + the rendered row, ending just before
    the answer). The model's answer continues it with ``answer_prefix`` (e.g. " ") + the answer.
    """

    method: str
    template: str
    template_format: TemplateFormat = "format"
    task: str = "generation"
    demo_separator: str = "\n\n"
    answer_separator: str = " "
    demos: list[Demonstration] = field(default_factory=list)
    # per_example: demos are drawn from this pool for each row (seeded by the row's content).
    demo_pool: list[Demonstration] = field(default_factory=list)
    per_example: bool = False
    shots: int = 0
    seed: int = 0
    verbalizer: dict[str, str] | None = None
    target_column: str = "target"
    base_model: str = ""
    has_adapter: bool = False
    model_kind: Literal["causal", "seq2seq"] = "causal"
    num_virtual_tokens: int = 0
    # Verbalizer-score calibration at classification time (see prompt.scoring).
    calibration: str = "none"
    # Prompts go through the model's chat template (see "Chat models" below).
    chat: bool = False

    def __post_init__(self) -> None:
        self.template_format = resolve_format(self.template, self.template_format)

    @cached_property
    def _renderer(self) -> _Renderer:
        return _Renderer(self.template, self.template_format)

    @property
    def fields(self) -> list[str]:
        """Columns the template reads."""
        return template_fields(self.template, self.template_format)

    def check_columns(self, columns: Iterable[str], *, field: str | None = None) -> None:
        """UserError when a data set lacks a column the template reads."""
        check_template_columns(
            self.template, columns, template_format=self.template_format, field=field
        )

    @property
    def answer_prefix(self) -> str:
        """Text between the prompt and the answer on the answer side (whitespace, often " ")."""
        if self.chat:
            return ""  # the reply starts right after the template's assistant header
        return split_separator(self.answer_separator)[1] if self.model_kind == "causal" else ""

    def label_word(self, label: Any) -> str:
        """The verbalizer word of a label (the label itself as text without a verbalizer)."""
        if self.verbalizer is None:
            return str(label)
        try:
            return self.verbalizer[str(label)]
        except KeyError:
            raise UserError(
                f"label {label!r} has no verbalizer word; the verbalizer has words for labels: "
                f"{', '.join(self.verbalizer)}"
            ) from None

    def continuation(self, answer: str) -> str:
        """What the model must produce after ``render(row)`` for this answer."""
        return self.answer_prefix + answer

    def render_row(self, row: Mapping[str, Any], *, field: str | None = None) -> str:
        """The row's own prompt (template + answer separator head), without demonstrations."""
        head = split_separator(self.answer_separator)[0]
        return self._renderer.render(row, field=field) + head

    def demos_for(self, row: Mapping[str, Any]) -> list[Demonstration]:
        """The demonstrations shown before this row."""
        if not self.per_example:
            return self.demos
        bare = self._renderer.render(row)
        # A pool row identical to the query would leak its answer (e.g. eval on training rows).
        leak = [i for i, d in enumerate(self.demo_pool) if d.prompt == bare]
        shots = min(self.shots, len(self.demo_pool) - len(leak))
        picked = select_demonstrations(
            len(self.demo_pool), shots, self.seed, key=row_key(row), exclude=leak
        )
        return [self.demo_pool[i] for i in picked]

    def format_demo(self, demo: Demonstration) -> str:
        """A demonstration as it appears in the prompt: prompt + separator + answer."""
        head, tail = split_separator(self.answer_separator)
        return demo.prompt + head + tail + demo.answer

    def render(self, row: Mapping[str, Any], *, field: str | None = None) -> str:
        """Full prompt for one row: demonstrations, then the rendered row, up to the answer."""
        if self.chat:
            return self._chat_prompt(self.demos_for(row), self.render_row(row, field=field))
        query = self.render_row(row, field=field)
        demos = self.demos_for(row)
        return "".join(self.format_demo(d) + self.demo_separator for d in demos) + query

    def content_free_rows(self) -> list[dict[str, str]]:
        """Rows whose every template field is one content-free input (contextual calibration)."""
        return [dict.fromkeys(self.fields, text) for text in CONTENT_FREE_INPUTS]

    def domain_premise(self) -> str:
        """The template's text after its last field, up to the answer: the domain-conditional
        PMI premise (Holtzman et al. 2021), e.g. "\nSentiment:" of "Review: {text}\nSentiment:".
        No demonstrations: the premise is how likely each answer is in the domain, without input."""
        marker = "\x00mlsteps-field\x00"
        rendered = self._renderer.render(dict.fromkeys(self.fields, marker))
        head = split_separator(self.answer_separator)[0]
        premise = rendered.rsplit(marker, 1)[-1] + head
        return self._chat_prompt([], premise) if self.chat else premise

    def postprocess(self, generated: str) -> str:
        """Clean a generated continuation: cut at the next demonstration, strip whitespace.

        A few-shot model often goes on to write the next demonstration; everything from the
        first ``demo_separator`` on is not part of the answer.
        """
        text = generated
        if self.shots and self.demo_separator and not self.chat:  # a chat reply ends its turn
            text = text.lstrip()
            cut = text.find(self.demo_separator)
            text = text if cut < 0 else text[:cut]
        return text.strip()

    # Chat models: hard prompts of a causal LM whose tokenizer has a chat template are chat
    # turns (each demonstration a user turn and the assistant's reply, the row the last user
    # turn), rendered by that template with its generation prompt, so the model sees the
    # format it was tuned on and exactly what apply_chat_template gives.

    def use_chat_template(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Render prompts through ``tokenizer``'s chat template (for ``chat`` prompters)."""
        self.__dict__["_chat_tokenizer"] = tokenizer

    def _chat_prompt(self, demos: list[Demonstration], query: str) -> str:
        from mlsteps.engine.chat_data import prompt_messages, render

        tokenizer = self.__dict__.get("_chat_tokenizer")
        if tokenizer is None:  # a caller bug, not a user error
            raise RuntimeError("a chat prompter renders only after use_chat_template(tokenizer)")
        head = split_separator(self.answer_separator)[0]
        turns = prompt_messages([(d.prompt + head, d.answer) for d in demos], query)
        return render(tokenizer, turns, generation_prompt=True)

    def to_json(self, final_dir: Path | None = None) -> dict[str, Any]:
        """The mlsteps_prompt.json payload; base_model also stored relative to final_dir."""
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        if final_dir is not None and Path(self.base_model).is_absolute():
            # Relative path too, so a run directory that was moved or copied still resolves.
            data["base_model_relative"] = os.path.relpath(self.base_model, final_dir)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], final_dir: Path | None = None) -> Prompter:
        """Inverse of :meth:`to_json`; resolves base_model against final_dir when needed."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise UserError(
                f"{PROMPT_FILE} has format version {version}; this mlsteps reads up to {FORMAT_VERSION}",
                hint="upgrade mlsteps",
            )
        relative = data.pop("base_model_relative", None)
        base = str(data.get("base_model", ""))
        if final_dir is not None and relative and not Path(base).exists():
            candidate = (Path(final_dir) / relative).resolve()
            if candidate.exists():
                data["base_model"] = str(candidate)
        for key in ("demos", "demo_pool"):
            data[key] = [Demonstration(**d) for d in data.get(key, [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def prompt_file(prompter: Prompter, final_dir: Path) -> dict[str, str]:
    """``{mlsteps_prompt.json: text}`` for ``save_final(extra_files=...)``: the one writer of the
    prompt file; ``base_model`` is also stored relative to ``final_dir``, where it will live."""
    text = json.dumps(prompter.to_json(final_dir), indent=2, ensure_ascii=False) + "\n"
    return {PROMPT_FILE: text}


def save_prompter(prompter: Prompter, directory: Path, *, final_dir: Path | None = None) -> Path:
    """Write mlsteps_prompt.json into ``directory`` (final.tmp/ while building final/)."""
    path = Path(directory) / PROMPT_FILE
    text = prompt_file(prompter, final_dir if final_dir is not None else Path(directory))
    path.write_text(text[PROMPT_FILE], encoding="utf-8")
    return path


def load_prompter(final_dir: Path | str) -> Prompter | None:
    """The Prompter of a prompted-model directory, or None when ``final_dir`` is not one."""
    path = Path(final_dir) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"unreadable {path}: {exc}") from None
    return Prompter.from_json(data, final_dir=Path(final_dir))


def demonstrations_from_rows(
    rows: Sequence[Mapping[str, Any]], prompter: Prompter, *, field: str | None = None
) -> list[Demonstration]:
    """Render training rows into demonstrations (answer = verbalizer word for classification)."""
    out = []
    for row in rows:
        prompt = prompter._renderer.render(row, field=field)
        out.append(
            Demonstration(prompt=prompt, answer=prompter.label_word(row[prompter.target_column]))
        )
    return out
