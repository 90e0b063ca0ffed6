"""How a stage loads its model: weight dtype, attention kernel, k-bit quantization (QLoRA).
Recipe pieces only (LoraSpec is in model.py); the loading itself is in engine/modeling.py
and engine/lora.py, through transformers, bitsandbytes and peft.

The dtype rule (docs/recipe-reference.md, README): ``model_dtype`` is the dtype of the weights
as loaded; ``train.precision`` is the dtype of the compute (autocast). Weights that train stay
fp32 (the master copy mixed precision updates), so half-precision weights are for frozen
weights only: a LoRA or soft-prompt base, and eval/predict. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from mlsteps.recipe.specs.base import Bool, Strict, Unused

ModelDtype = Literal["auto", "fp32", "bf16", "fp16"]

# transformers' own attention implementations; a hub kernel ("kernels-community/flash-attn")
# and the paged variants ("paged|sdpa") are passed through as well.
ATTN_IMPLEMENTATIONS = (
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
)  # fmt: skip
_HUB_KERNEL_RE = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w.-]+)?$")
# Packages an implementation needs (checked by validate without importing them).
_ATTN_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}

DTYPE_DESCRIPTION = (
    "Dtype of the loaded weights: auto (fp32: the master copy mixed precision trains from, and "
    "exact scores), fp32, bf16 or fp16 (half the memory; fp16 needs CUDA). Half-precision "
    "weights are only for weights that stay frozen (a LoRA, QLoRA or soft-prompt base; eval, "
    "predict): weights that train need fp32, and train.precision sets the compute dtype."
)
ATTN_DESCRIPTION = (
    "Attention kernel passed to from_pretrained/from_config (eager, sdpa, flash_attention_2, "
    "flash_attention_3, flex_attention, a hub kernel 'org/name', or 'paged|sdpa'); unset: "
    "transformers' default (sdpa where supported). The kernel in use is recorded in the "
    "stage's metrics (attn_implementation)."
)


def model_dtype_field() -> Any:
    """The ``model_dtype`` field of a stage that loads a model."""
    return Field("auto", description=DTYPE_DESCRIPTION)


def attn_field() -> Any:
    """The ``attn_implementation`` field of a stage that loads a model."""
    return Field(None, description=ATTN_DESCRIPTION)


def _missing(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def check_attn(value: str | None) -> str | None:
    """ValueError for a name that is neither transformers' nor a hub kernel's."""
    if value is None or value in ATTN_IMPLEMENTATIONS or _HUB_KERNEL_RE.match(value):
        return value
    if value.startswith("paged|") and value.removeprefix("paged|") in ATTN_IMPLEMENTATIONS:
        return value
    raise ValueError(
        f"unknown attn_implementation {value!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
        "'paged|<one of them>' or a hub kernel 'org/name'"
    )


AttnImplementation = Annotated[str, AfterValidator(check_attn)]


class QuantizationSpec(Strict):
    """Load the frozen base in k-bit through bitsandbytes (QLoRA: only with LoRA; needs CUDA)."""

    bits: Literal[4, 8] = Field(..., description="4 (NF4/FP4, QLoRA) or 8 (LLM.int8) bit weights.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit: the data type of the weights (bnb_4bit_quant_type)."
    )
    double_quant: Bool = Field(
        True,
        description="4-bit: quantize the quantization constants too "
        "(bnb_4bit_use_double_quant; about 0.4 bits per weight saved).",
    )
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="4-bit: the dtype 4-bit layers compute in (bnb_4bit_compute_dtype)."
    )

    def _ignored(self) -> list[Unused]:
        if self.bits == 4:
            return []
        return self._unused(
            ("quant_type", "double_quant", "compute_dtype"),
            "bits is 8 (these are 4-bit settings)",
        )

    def _invalid(self) -> list[Unused]:
        if _missing("bitsandbytes"):
            return [("bits", "the bitsandbytes package is not installed", QUANT_FIX)]
        return []

    def bnb_kwargs(self) -> dict[str, Any]:
        """transformers.BitsAndBytesConfig keyword arguments (dtype names, no torch import)."""
        if self.bits == 8:
            return {"load_in_8bit": True}
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": TORCH_DTYPES[self.compute_dtype],
        }

    def describe(self) -> str:
        """One line for the stage's metrics: '4-bit nf4 (double quant, compute bf16)'."""
        if self.bits == 8:
            return "8-bit LLM.int8 (bitsandbytes)"
        extra = ", double quant" if self.double_quant else ""
        return f"4-bit {self.quant_type} (bitsandbytes{extra}, compute {self.compute_dtype})"


QUANT_FIX = "pip install 'mlsteps[quant]' (bitsandbytes), or remove 'quantization'"
QUANT_DESCRIPTION = (
    "Load the base model in 4 or 8 bits through bitsandbytes and prepare it with peft's "
    "prepare_model_for_kbit_training (QLoRA): only with method lora, needs a CUDA GPU (refused "
    "at run start otherwise) and `pip install 'mlsteps[quant]'`."
)
# Recipe names -> torch dtype names (getattr(torch, name) where torch is imported).
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def loading_problems(spec: Any, *, weights_train: bool) -> list[Unused]:
    """The model-loading fields of ``spec`` that cannot work: (key, what, fix).

    ``weights_train``: the stage updates the loaded weights themselves (full fine-tuning,
    pretraining) rather than an adapter or soft prompt on a frozen base."""
    out: list[Unused] = []
    dtype = getattr(spec, "model_dtype", "auto")
    if weights_train and dtype in ("bf16", "fp16"):
        out.append(
            (
                "model_dtype",
                f"{dtype} weights would be trained without an fp32 master copy (updates "
                "smaller than the weights' precision are lost)",
                f"remove it and set train.precision: {dtype} (mixed precision on fp32 weights), "
                "or train an adapter (method: lora)",
            )
        )
    precision = getattr(getattr(spec, "train", None), "precision", "auto")
    half = {"bf16", "fp16"}
    if dtype in half and precision in half and precision != dtype:
        out.append(
            (
                "model_dtype",
                f"{dtype} weights under train.precision {precision} would compute in a "
                "third mix of types",
                f"use the same half type for both (model_dtype: {precision})",
            )
        )
    attn = getattr(spec, "attn_implementation", None)
    package = _ATTN_PACKAGES.get(attn or "")
    if package and _missing(package):
        out.append(
            (
                "attn_implementation",
                f"{attn} needs the {package} package, which is not installed",
                "install it (CUDA only), or use sdpa",
            )
        )
    return out


def needs_cuda(spec: Any) -> list[tuple[str, str]]:
    """(key, what) of each setting of ``spec`` that only works on a CUDA GPU."""
    out = []
    if getattr(spec, "quantization", None) is not None:
        out.append(("quantization", "bitsandbytes k-bit quantization"))
    if getattr(spec, "model_dtype", "auto") == "fp16":
        out.append(("model_dtype", "fp16 weights"))
    return out


def check_devices(recipe: Any) -> None:
    """At run start, before anything is written: a stage that needs CUDA where there is none
    is exit 2 (``validate`` cannot know the machine the recipe will run on: it never imports
    torch, so it only checks that the packages are installed)."""
    from mlsteps.errors import UserError

    wanted = [(name, key, what) for name, s in recipe.stages.items() for key, what in needs_cuda(s)]
    if not wanted:
        return
    import torch  # only for recipes that ask for a CUDA-only setting

    if torch.cuda.is_available():
        return
    name, key, what = wanted[0]
    raise UserError(
        f"{what} needs a CUDA GPU, and this machine has none",
        where=f"stages.{name}.{key}",
        hint="remove it to run on CPU (model_dtype: bf16 works on CPU for frozen weights)",
    )
