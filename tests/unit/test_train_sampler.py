"""The training shuffle (engine/sampler.py): accelerate's seeded order, epoch by epoch, without
a Python list of every index per epoch (memory that grew with the corpus: ~38 bytes a block)."""

from __future__ import annotations

import tracemalloc
from itertools import islice

import torch
from accelerate.data_loader import SeedableRandomSampler
from transformers import Trainer, TrainingArguments

from mlsteps.engine.sampler import PermutationSampler
from mlsteps.engine.train_callbacks import MlstepsTrainerMixin


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": [i]}


def test_same_order_as_accelerates_seedable_sampler() -> None:
    ours = PermutationSampler(1000, seed=7)
    theirs = SeedableRandomSampler(data_source=range(1000), data_seed=7)
    for epoch in range(3):  # a finished pass moves both to the next epoch
        assert list(ours) == list(theirs), epoch
    ours.set_epoch(1)
    theirs.set_epoch(1)
    assert list(islice(iter(ours), 50)) == list(islice(iter(theirs), 50))


def test_the_trainers_sampler_holds_no_list_of_every_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cls = type("T", (MlstepsTrainerMixin, Trainer), {})
    args = TrainingArguments(output_dir=str(tmp_path), data_seed=3, report_to=[])
    trainer = cls(model=torch.nn.Linear(1, 1), args=args, train_dataset=_Rows(1_000_000))
    sampler = trainer._get_train_sampler()
    tracemalloc.start()
    first = next(iter(sampler))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # torch's RandomSampler: a 1,000,000-int list (~36 MB) before the first index.
    assert isinstance(first, int) and peak < 8 << 20, peak
