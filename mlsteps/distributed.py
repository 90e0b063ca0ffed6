"""Distributed runs: the launcher, rank helpers, barriers and exactly-once sharding.

- Launching goes through torchrun's own engine (``torch.distributed.run`` argument parsing and
  ``elastic_launch``); ``mlsteps run --nproc-per-node N`` is ``torchrun --nproc-per-node N -m
  mlsteps run ...`` with exit codes mapped onto the CLI contract. ``torchrun`` and
  ``accelerate launch`` work directly too: everything here reads the standard environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
- Every helper is a no-op in a single process, and nothing here imports torch at module level:
  the CLI imports this module for ``--help``.
- Evaluation shards examples by index with no padding (``shard_indices``), so every example is
  scored exactly once, and ``gather_ordered`` puts the results back in input order on every rank.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from mlsteps.errors import (
    EXIT_INTERRUPTED,
    EXIT_STAGE_FAILED,
    EXIT_USAGE,
    MlstepsError,
    StageFailed,
    StageInterrupted,
    UserError,
)

if TYPE_CHECKING:
    from mlsteps.recipe.specs.distributed import DistributedSpec

T = TypeVar("T")
R = TypeVar("R")

_SETTINGS: dict[str, Any] = {"spec": None}


# ---------------------------------------------------------------------------- ranks


def rank() -> int:
    """Global rank under torchrun/accelerate/srun-with-torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the only process that writes run-level files, metrics.jsonl and final/."""
    return rank() == 0


def inside_launcher() -> bool:
    """True in a process started by torchrun / accelerate launch (even with one process)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


# ---------------------------------------------------------------------------- settings


def configure(spec: DistributedSpec | None) -> None:
    """Remember the recipe's ``distributed:`` block for the training engine of this process."""
    _SETTINGS["spec"] = spec


def settings() -> DistributedSpec:
    from mlsteps.recipe.specs.distributed import DistributedSpec

    spec = _SETTINGS["spec"]
    return spec if spec is not None else DistributedSpec()


def backend() -> str:
    """'nccl' (with gloo for CPU tensors) on CUDA, 'gloo' on CPU, unless the recipe says."""
    import torch

    chosen = settings().backend
    if chosen == "auto":
        chosen = "nccl" if torch.cuda.is_available() else "gloo"
    return "cuda:nccl,cpu:gloo" if chosen == "nccl" else chosen


def _dist() -> Any:
    """torch.distributed once this process is part of an initialised group, else None."""
    if not is_distributed():
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        init_process_group()
    return dist


def init_process_group() -> None:
    """Join the process group (idempotent); the Trainer/accelerate reuse it."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend(), timeout=timedelta(seconds=settings().timeout_s))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s value on every rank (pickled; keep it small)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's value, in rank order, on every rank."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(value: float) -> float:
    """Sum of a number over all ranks."""
    return float(sum(all_gather_object(value)))


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache); the others wait, then run it.

    If the block fails on rank 0 the others are still released: they run it too and, with the
    same data, fail with the same error instead of waiting at the barrier until the timeout.
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# kind, message, absolute location, relative field path, hint
_Payload = tuple[str, str, str | None, str | None, str | None]


def _error_payload(exc: BaseException) -> _Payload:
    if isinstance(exc, MlstepsError):
        # The field stays relative: the scopes around run_on_main prefix it on every rank alike.
        return type(exc).__name__, exc.message, exc.location, exc.field, exc.hint
    return "StageFailed", f"{type(exc).__name__}: {exc}", None, None, None


_ERRORS: dict[str, type[MlstepsError]] = {
    "UserError": UserError,
    "StageFailed": StageFailed,
    "StageInterrupted": StageInterrupted,
}


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An error on rank 0 is raised on every rank as the same kind of MlstepsError (same exit code),
    so no rank waits forever for a result that will not come.
    """
    if not is_distributed():
        return fn()
    result: Any = None
    error: _Payload | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            error = _error_payload(exc)
            broadcast_object((None, error))
            raise
    payload = broadcast_object((result, error))
    result, error = payload
    if error is not None:
        kind, message, where, field, hint = error
        raise _ERRORS.get(kind, StageFailed)(
            f"rank 0: {message}", where=where, field=field, hint=hint
        )
    return result  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- sharding


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """Indices of ``n`` examples this rank handles: ``rank, rank + W, ...``.

    No padding and no duplicates: shard sizes differ by at most one and together cover
    ``range(n)`` exactly once (a rank may get none when ``n < W``).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return range(r, n, w)


def gather_ordered(local: Sequence[T], n: int) -> list[T]:
    """Reassemble per-rank results of ``shard_indices(n)`` into input order on every rank."""
    w = world_size()
    if w == 1:
        return list(local)
    parts = all_gather_object(list(local))
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        indices = shard_indices(n, r, w)
        if len(part) != len(indices):
            raise StageFailed(f"rank {r} returned {len(part)} results for {len(indices)} examples")
        for i, value in zip(indices, part, strict=True):
            out[i] = value
    return out


def map_sharded(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` computed in shards across ranks, returned whole and in order on every rank.

    ``fn`` maps a list to an equally long list (one result per item, independent of the other
    items). It is also called, with an empty list, on a rank whose shard is empty, so it must
    accept that (or the caller must guard it).
    """
    if not is_distributed():
        return list(fn(list(items)))
    indices = shard_indices(len(items))
    local = [items[i] for i in indices]
    results = list(fn(local)) if local else []
    return gather_ordered(results, len(items))


# ---------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class LaunchOptions:
    """torchrun's topology flags, as given to ``mlsteps run``."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    # None on one node: torchrun picks a free port (c10d rendezvous on localhost:0).
    master_port: int | None = None
    max_restarts: int = 0

    def torchrun_args(self) -> list[str]:
        args = [
            f"--nproc-per-node={self.nproc_per_node}",
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            f"--max-restarts={self.max_restarts}",
        ]
        if self.master_addr is not None:
            args.append(f"--master-addr={self.master_addr}")
        if self.master_port is not None:
            args.append(f"--master-port={self.master_port}")
        return args


def check_options(opts: LaunchOptions) -> None:
    """Reject impossible topologies before anything starts (exit 2)."""
    if opts.nproc_per_node < 1:
        raise UserError("--nproc-per-node must be at least 1")
    if opts.nnodes < 1:
        raise UserError("--nnodes must be at least 1")
    if not 0 <= opts.node_rank < opts.nnodes:
        raise UserError(
            f"--node-rank {opts.node_rank} is not in 0..{opts.nnodes - 1}",
            hint="number the nodes 0 .. nnodes-1, one launcher per node",
        )
    if opts.master_port is not None and not 0 < opts.master_port < 65536:
        raise UserError(f"--master-port {opts.master_port} is not a TCP port")
    if opts.nnodes > 1 and (opts.master_addr is None or opts.master_port is None):
        raise UserError(
            "--nnodes > 1 needs --master-addr and --master-port (node 0's address and a free port)",
            hint="pass the same --master-addr/--master-port to the launcher on every node",
        )


def launch(opts: LaunchOptions, mlsteps_args: list[str]) -> int:
    """Start ``python -m mlsteps MLSTEPS_ARGS`` on this node's processes through torchrun's engine.

    Returns the exit code for the CLI: 0 when every process succeeded; otherwise the first
    failing process's code if it is one of the contract's (2 usage, 130 interrupted), else 1
    (a crash, or a process killed by a signal). When one process dies, torchrun stops the others
    on this node; peers on other nodes fail on their next collective, at the latest after
    ``distributed.timeout_s``.
    """
    check_options(opts)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    argv = [*opts.torchrun_args(), "-m", "mlsteps", *mlsteps_args]
    try:
        torchrun(parse_args(argv))
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code in (EXIT_USAGE, EXIT_INTERRUPTED):
            return code
        print(
            f"error: process rank {failed_rank} failed with exit code {code}"
            + (f" (signal {-code})" if code < 0 else ""),
            file=sys.stderr,
        )
        return EXIT_STAGE_FAILED
    except SignalException as exc:
        print(f"interrupted by {exc.sigval.name}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
