"""Typed recipe models: one per stage kind, discriminated on `kind`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mlsteps.recipe.specs import _build  # first: no plugin discovery while the models build
from mlsteps.recipe.specs.base import Strict
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.distributed import DistributedSpec
from mlsteps.recipe.specs.evaluate import EvalSpec, PerplexitySpec, PredictSpec
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.recipe.specs.model import ArchSpec, GenerationSpec, LoraSpec
from mlsteps.recipe.specs.preference import PreferenceSpec
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.recipe.specs.prompt import PromptSpec
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.recipe.specs.train import TrainSpec

StageSpec = Annotated[
    TokenizerSpec
    | PretrainSpec
    | FinetuneSpec
    | PreferenceSpec
    | PromptSpec
    | EvalSpec
    | PredictSpec,
    Field(discriminator="kind"),
]

SPEC_BY_KIND: dict[str, type[Strict]] = {
    "tokenizer": TokenizerSpec,
    "pretrain": PretrainSpec,
    "finetune": FinetuneSpec,
    "preference": PreferenceSpec,
    "prompt": PromptSpec,
    "eval": EvalSpec,
    "predict": PredictSpec,
}

_build.done()

__all__ = [
    "ArchSpec",
    "DataSpec",
    "DistributedSpec",
    "EvalSpec",
    "FinetuneSpec",
    "GenerationSpec",
    "LoraSpec",
    "PerplexitySpec",
    "PreferenceSpec",
    "PredictSpec",
    "PretrainSpec",
    "PromptSpec",
    "SPEC_BY_KIND",
    "StageSpec",
    "Strict",
    "TokenizerSpec",
    "TrainSpec",
]
