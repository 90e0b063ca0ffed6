"""The recipe's optional ``distributed:`` block: process-group settings, FSDP or DeepSpeed.

Plain data parallelism (DDP) needs no block at all: launch with ``mlsteps run --nproc-per-node N``
(or ``torchrun``/``accelerate launch``) and every training stage runs on all processes. The
block only tunes the process group and switches a training stage to FSDP or DeepSpeed; stages
that do not train (tokenizer, eval, predict) ignore FSDP/DeepSpeed and shard their work by
example instead.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import Bool, Int, NotBool, PositiveInt, Strict, Unused

# datetime.timedelta (the process-group timeout) overflows beyond 999,999,999 days; a year is
# already far past any real collective.
TIMEOUT_MAX_S = 10**9


class FsdpSpec(Strict):
    """PyTorch FSDP (version 2, ``fully_shard``) through the transformers Trainer/accelerate."""

    sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="'full_shard' shards parameters, gradients and optimizer state and frees "
        "gathered parameters after each forward (ZeRO-3-like, least memory); 'shard_grad_op' keeps "
        "parameters gathered between forward and backward (ZeRO-2-like, fewer all-gathers).",
    )
    auto_wrap: Literal["transformer_layer", "size", "none"] = Field(
        "transformer_layer",
        description="Which submodules become FSDP units: 'transformer_layer' wraps every "
        "transformer block (the model's _no_split_modules, or 'wrap_layer_classes'); 'size' wraps "
        "modules with at least 'min_params' parameters; 'none' shards the model as one unit.",
    )
    wrap_layer_classes: list[str] | None = Field(
        None,
        description="Class names of the blocks to wrap with auto_wrap 'transformer_layer', e.g. "
        "[LlamaDecoderLayer]; default: the model's own _no_split_modules.",
    )
    min_params: PositiveInt = Field(
        1_000_000, description="Smallest module (in parameters) wrapped with auto_wrap 'size'."
    )
    state_dict: Literal["full", "sharded"] = Field(
        "full",
        description="Checkpoint format: 'full' gathers one HF-compatible state dict on rank 0 "
        "(checkpoints resumable at any world size); 'sharded' writes one file per rank (faster "
        "for large models; resume needs the same world size). final/ is always a full model.",
    )
    cpu_offload: Bool = Field(
        False, description="Keep sharded parameters and gradients in CPU memory between uses."
    )
    activation_checkpointing: Bool = Field(
        False,
        description="FSDP's own activation checkpointing per wrapped block (prefer this over "
        "train.gradient_checkpointing under FSDP).",
    )

    def _ignored(self) -> list[Unused]:
        out = []
        if self.auto_wrap != "transformer_layer":
            out += self._unused(("wrap_layer_classes",), f"auto_wrap is {self.auto_wrap}")
        if self.auto_wrap != "size":
            out += self._unused(("min_params",), f"auto_wrap is {self.auto_wrap}")
        return out

    def trainer_config(self) -> dict[str, object]:
        """The ``fsdp_config`` dict of transformers' TrainingArguments."""
        config: dict[str, object] = {
            "version": 2,
            "reshard_after_forward": self.sharding == "full_shard",
            "auto_wrap_policy": {
                "transformer_layer": "TRANSFORMER_BASED_WRAP",
                "size": "SIZE_BASED_WRAP",
                "none": "NO_WRAP",
            }[self.auto_wrap],
            "state_dict_type": {"full": "FULL_STATE_DICT", "sharded": "SHARDED_STATE_DICT"}[
                self.state_dict
            ],
            "cpu_offload": self.cpu_offload,
            "activation_checkpointing": self.activation_checkpointing,
        }
        if self.auto_wrap == "size":
            config["min_num_params"] = self.min_params
        if self.wrap_layer_classes:
            config["transformer_layer_cls_to_wrap"] = list(self.wrap_layer_classes)
        return config


class DeepSpeedSpec(Strict):
    """DeepSpeed ZeRO through the transformers Trainer (needs the `deepspeed` package).

    Give either ``config`` (a DeepSpeed JSON file, used as is) or ``zero_stage`` (mlsteps writes a
    minimal config whose batch sizes, clipping and precision follow the stage's ``train`` block).
    """

    config: str | None = Field(
        None,
        description="Path to a DeepSpeed JSON config; 'auto' values are filled in by transformers "
        "from the stage's train settings.",
    )
    zero_stage: Annotated[Literal[0, 1, 2, 3], NotBool] | None = Field(
        None,
        description="Inline ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also "
        "parameters (0: plain data parallel through DeepSpeed).",
    )
    offload_optimizer: Bool = Field(
        False, description="Inline config only: keep optimizer state in CPU memory (ZeRO-Offload)."
    )
    offload_params: Bool = Field(
        False, description="Inline config only, zero_stage 3: keep parameters in CPU memory."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DeepSpeedSpec:
        if (self.config is None) == (self.zero_stage is None):
            raise ValueError(
                "deepspeed needs exactly one of 'config' (a JSON file) or 'zero_stage'"
            )
        if self.config is not None and (self.offload_optimizer or self.offload_params):
            raise ValueError(
                "offload_optimizer/offload_params only apply to an inline zero_stage; "
                "set offloading inside the config file"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self

    def trainer_config(self) -> str | dict[str, object]:
        """The ``deepspeed`` argument of TrainingArguments: the file path or an inline dict."""
        if self.config is not None:
            return self.config
        zero: dict[str, object] = {"stage": self.zero_stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        if self.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ is a full model
        return {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": zero,
        }


class DistributedSpec(Strict):
    """How a recipe runs on several processes (used only when launched with several)."""

    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="torch.distributed backend: 'auto' is nccl on CUDA GPUs (with gloo for CPU "
        "tensors) and gloo on CPU.",
    )
    timeout_s: Annotated[Int, Field(ge=10, le=TIMEOUT_MAX_S)] = Field(
        1800,
        description="Seconds a collective may wait for the other processes before the run fails "
        "(bounds the hang when a process dies without its peers noticing).",
    )
    find_unused_parameters: Bool = Field(
        False,
        description="DDP: tolerate parameters that get no gradient in a step (slower; needed by "
        "some LoRA/prompt setups that freeze parts of the graph conditionally).",
    )
    fsdp: FsdpSpec | None = Field(
        None, description="Shard training with FSDP (mutually exclusive with deepspeed)."
    )
    deepspeed: DeepSpeedSpec | None = Field(
        None, description="Shard training with DeepSpeed ZeRO (mutually exclusive with fsdp)."
    )

    def _ignored(self) -> list[Unused]:
        if self.fsdp is None and self.deepspeed is None:
            return []
        engine = "fsdp" if self.fsdp is not None else "deepspeed"
        return self._unused(
            ("find_unused_parameters",), f"it is a DDP setting and {engine} is used"
        )

    @model_validator(mode="after")
    def _one_engine(self) -> DistributedSpec:
        if self.fsdp is not None and self.deepspeed is not None:
            raise ValueError("choose one of 'fsdp' or 'deepspeed', not both")
        return self
