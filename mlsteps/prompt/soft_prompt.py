"""Soft prompts with peft: prompt tuning, prefix tuning and p-tuning on a frozen base model.

Two pieces of glue around peft 0.21 + transformers 5:

- The transformers Trainer resumes a peft model with ``load_adapter(..., is_trainable=True)``,
  which peft refuses for prompt-learning adapters ("Cannot set a prompt learning adapter to
  trainable"); :class:`SoftPromptTrainer` loads the checkpoint's adapter weights instead.
- ``generate`` of a prompt-learning model is wrong with the KV cache: transformers 5 passes the
  cache as ``cache`` (was ``past_key_values``), peft does not see it and re-inserts the virtual
  tokens at every decoding step (logits off by ~0.4 on a tiny gpt2, text garbage after the first
  token). peft also drops ``position_ids``, so left padding shifts the positions of a padded row
  (gpt2 prompt tuning: logits off by ~0.5). :func:`generate_prompted` decodes without the cache
  and batches only prompts of equal token length (no padding): exact, at O(n^2) decoding cost.
  Scoring/training use right padding, which is batch-invariant for all three methods.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers import Trainer

from mlsteps.errors import UserError
from mlsteps.prompt.calibration import classify_prompted
from mlsteps.prompt.scoring import (
    PromptCollator,
    build_example,
    encode_answer,
    encode_prompt,
    pad_id_of,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def peft_config(
    method: str, *, seq2seq: bool, num_virtual_tokens: int
) -> PromptTuningConfig | PrefixTuningConfig | PromptEncoderConfig:
    """The peft config of a soft-prompt method (text initialisation is applied afterwards)."""
    task_type = TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM
    if method == "prompt_tuning":
        # Without init_text: embeddings of randomly sampled vocabulary tokens, which start at the
        # scale of real token embeddings (Lester et al. 2021 found this beats N(0, 1) noise).
        return PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init="SAMPLE_VOCAB",
        )
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    raise ValueError(f"not a soft-prompt method: {method}")


def check_supported(model: Any, method: str, *, gradient_checkpointing: bool) -> None:
    """UserError for combinations peft cannot train, found before any work starts."""
    if method != "prefix_tuning":
        return
    model_type = getattr(model.config, "model_type", "?")
    if gradient_checkpointing:
        # peft raises this itself, deep inside get_peft_model.
        raise UserError(
            "prefix_tuning does not work with gradient checkpointing",
            field="train.gradient_checkpointing",
            hint="set it to false, or use prompt_tuning / p_tuning",
        )
    params = inspect.signature(model.forward).parameters
    # peft injects the prefix as a key/value cache; a model without one cannot take it
    # (transformers 5 renamed the argument past_key_values -> cache).
    if "past_key_values" not in params and "cache" not in params:
        raise UserError(
            f"prefix_tuning needs a model that takes a key/value cache; {model_type} does not",
            field="method",
            hint="use prompt_tuning or p_tuning",
        )


def wrap(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    method: str,
    num_virtual_tokens: int,
    init_text: str | None,
    gradient_checkpointing: bool,
) -> PeftModel:
    """Freeze ``model`` and add a trainable soft prompt; checked with one forward pass. Errors
    name the prompt stage's fields (``method``, ``init_text``): call it in the stage's scope.

    Seed the RNG before calling (``transformers.set_seed``): the initial prompt is random.
    """
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    check_supported(model, method, gradient_checkpointing=gradient_checkpointing)
    init_ids: list[int] = []
    if init_text is not None:
        init_ids = list(tokenizer(init_text, add_special_tokens=False)["input_ids"])
        if not init_ids:
            raise UserError(f"init_text {init_text!r} tokenises to nothing", field="init_text")
    config = peft_config(method, seq2seq=seq2seq, num_virtual_tokens=num_virtual_tokens)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(
            f"peft cannot apply {method} to a {model.config.model_type} model: {exc}",
            field="method",
        ) from exc
    if init_ids:
        _init_from_ids(peft_model, init_ids)
    _smoke_test(peft_model, tokenizer, method=method)
    return peft_model


def _init_from_ids(model: PeftModel, ids: list[int]) -> None:
    """Copy the embeddings of ``ids`` (repeated, then cut) into the virtual tokens.

    Done here rather than with peft's TEXT init, which reloads the tokenizer by name (a hub id
    or path, without trust_remote_code) and tokenises with special tokens.
    """
    embedding: Any = model.prompt_encoder["default"].embedding
    total = embedding.weight.shape[0]
    reps = math.ceil(total / len(ids))
    index = torch.tensor((ids * reps)[:total], device=embedding.weight.device)
    with torch.no_grad():
        base: Any = model.get_base_model()
        words = base.get_input_embeddings()(index)
        embedding.weight.copy_(words.to(embedding.weight.dtype))


def _smoke_test(model: PeftModel, tokenizer: PreTrainedTokenizerBase, *, method: str) -> None:
    """One tiny training forward/backward, so an unsupported architecture fails as a UserError
    before training starts instead of as a traceback in the middle of it."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    example = build_example(tokenizer, "a", "b", seq2seq=seq2seq, max_seq_len=8)
    batch = PromptCollator(pad_id_of(tokenizer))([example])
    device = next(model.parameters()).device
    try:
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
    except Exception as exc:
        raise UserError(
            f"peft {method} does not work with this {model.config.model_type} model: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            field="method",
            hint="try another soft-prompt method or model family",
        ) from exc
    finally:
        model.zero_grad(set_to_none=True)


def trainable_parameters(model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def virtual_positions(model: PeftModel) -> int:
    """Positions the soft prompt takes in front of the input (all methods use them)."""
    return int(model.active_peft_config.num_virtual_tokens)


class SoftPromptTrainer(Trainer):
    """Trainer that resumes prompt-learning adapters (see the module docstring)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
            weights = load_peft_weights(str(Path(resume_from_checkpoint)), device="cpu")
            # For prompt learning this loads the prompt encoder explicitly; the generic
            # load_state_dict result it returns lists those keys as "unexpected", so it is
            # not a completeness signal (the resume test compares weights instead).
            set_peft_model_state_dict(model, weights, adapter_name="default")
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def build_dataset(
    rows: list[dict[str, Any]],
    prompter: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
) -> Any:
    """Tokenised training examples: rendered prompt, then answer (+EOS) as the only labels."""
    import datasets

    seq2seq = prompter.model_kind == "seq2seq"
    examples = [
        build_example(
            tokenizer,
            prompter.render(row),
            prompter.continuation(prompter.label_word(row[prompter.target_column])),
            seq2seq=seq2seq,
            max_seq_len=max_seq_len,
        )
        for row in rows
    ]
    return datasets.Dataset.from_list(examples)


def build_verbalizer_dataset(
    rows: list[dict[str, Any]],
    prompter: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
) -> Any:
    """Classification through the verbalizer: per row, one candidate sequence per label (prompt +
    that label's word, the word's tokens as ``labels``) and the gold label's index.

    :class:`VerbalizerTrainer` scores every candidate as rank classification does (the summed
    log-probability of the word, no EOS) and takes the cross-entropy over the labels: the soft
    prompt learns to make the right word win against the other words, not to predict the word
    against the whole vocabulary (which a frequent word can satisfy for every row).
    """
    import datasets

    labels = list(prompter.verbalizer)
    words = [
        encode_answer(tokenizer, prompter.continuation(prompter.verbalizer[lb])) for lb in labels
    ]
    examples = []
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, prompter.render(row))
        candidates, targets = [], []
        for word in words:
            word = word[: max_seq_len - 1]
            prompt = prompt_ids[-(max_seq_len - len(word)) :]
            candidates.append(prompt + word)
            targets.append([-100] * len(prompt) + word)
        gold = labels.index(str(row[prompter.target_column]))
        examples.append(
            {"candidates": candidates, "candidate_labels": targets, "class_label": gold}
        )
    return datasets.Dataset.from_list(examples)


@dataclass
class VerbalizerCollator:
    """Flattens the candidates of a batch of rows into one right-padded batch (rows x labels)."""

    pad_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        flat = [
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target}
            for f in features
            for ids, target in zip(f["candidates"], f["candidate_labels"], strict=True)
        ]
        batch = PromptCollator(self.pad_id)(flat)
        batch["class_labels"] = torch.tensor([f["class_label"] for f in features], dtype=torch.long)
        return batch


def candidate_logprobs(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ log p(label tokens) per candidate row of a collated batch (with gradient)."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # Prompt-learning models may prepend virtual positions: the trailing ones are the input's.
    logits = out.logits[:, -labels.shape[1] :][:, :-1]
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


class VerbalizerTrainer(SoftPromptTrainer):
    """Soft-prompt trainer whose loss is the cross-entropy over the verbalizer words' scores."""

    def compute_loss(  # type: ignore[override]
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        class_labels = inputs["class_labels"]
        scores = candidate_logprobs(model, inputs).view(class_labels.shape[0], -1)
        loss = torch.nn.functional.cross_entropy(scores, class_labels)
        return (loss, {"logits": scores}) if return_outputs else loss


def classification_eval(
    prompter: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """extra_eval hook: rank-classification accuracy of the current soft prompt on ``rows``."""
    assert prompter.verbalizer is not None
    prompts = [prompter.render(r) for r in rows]
    gold = [str(r[prompter.target_column]) for r in rows]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        predicted = classify_prompted(model, tokenizer, prompter, prompts, batch_size=batch_size)
        return {
            "val_accuracy": sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
        }

    return evaluate


def preview_records(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompter: Any,
    rows: list[dict[str, Any]],
    *,
    seed: int,
) -> list[dict[str, Any]]:
    """Prompt, expected answer and the model's output (greedy generation, or the ranked label)."""
    from mlsteps.recipe.specs.model import GenerationSpec

    if not rows:
        return []
    prompts = [prompter.render(r) for r in rows]
    targets = [prompter.label_word(r[prompter.target_column]) for r in rows]
    records = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    if prompter.verbalizer:
        labels = classify_prompted(model, tokenizer, prompter, prompts)
        for record, label in zip(records, labels, strict=True):
            record["predicted_label"] = label
            record["output"] = prompter.verbalizer[label]
        return records
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    spec = GenerationSpec.model_validate({"max_new_tokens": min(64, longest + 4), "batch_size": 8})
    outputs = generate_prompted(model, tokenizer, prompts, spec, seed=seed)
    for record, output in zip(records, outputs, strict=True):
        record["output"] = prompter.postprocess(output)
    return records


def is_prompt_learning(model: Any) -> bool:
    """True for a peft model whose active adapter is a soft prompt."""
    return isinstance(model, PeftModel) and bool(model.active_peft_config.is_prompt_learning)


@contextlib.contextmanager
def _without_kv_cache(model: Any) -> Iterator[None]:
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config")
        if config is None:
            kwargs["use_cache"] = False
        else:  # transformers deprecates mixing a generation_config with loose settings
            kwargs["generation_config"] = copy.deepcopy(config)
            kwargs["generation_config"].use_cache = False
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate  # back to the class's method


def generate_prompted(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], spec: Any, *, seed: int
) -> list[str]:
    """``engine.generation.generate``, exact for peft prompt-learning models too.

    Plain models go straight through. Soft-prompt models decode without the KV cache, one
    batch per prompt token length (see the module docstring for why). Outputs in input order.
    """
    from mlsteps.engine.generation import generate

    if not is_prompt_learning(model):
        return generate(model, tokenizer, list(prompts), spec, seed=seed)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    outputs = [""] * len(prompts)
    with _without_kv_cache(model):
        for indices in groups.values():
            texts = generate(model, tokenizer, [prompts[i] for i in indices], spec, seed=seed)
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
    return outputs
