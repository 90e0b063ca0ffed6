"""Distributed runs on CPU (gloo): 2 ranks reproduce 1 rank, evaluation scores every example
exactly once in input order, rank 0 alone writes, the launcher maps failures onto exit codes.

The fast tests share one 2-process group (torch.multiprocessing spawn + gloo) that runs both the
sharding helpers and a real recipe (pretrain + eval) through ``run_recipe``; the single-process
references run in the test process. Launcher tests (``mlsteps run --nproc-per-node``, 2 nodes on
localhost, a killed rank) start real torchrun process groups and are marked slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mlsteps import distributed
from mlsteps.distributed import LaunchOptions, check_options, map_sharded, shard_indices
from mlsteps.errors import UserError
from mlsteps.recipe.specs.distributed import DeepSpeedSpec, DistributedSpec, FsdpSpec

SIZES = (7, 40, 101)
WORDS = "the a toy river stone bird sings under over red blue small quick lazy fox dog".split()
SPAWN_TIMEOUT_S = 240

RECIPE = """
name: dist
seed: 3
stages:
  pre:
    kind: pretrain
    objective: clm
    tokenizer: {tok}
    model: {{family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 64}}
    data: {{builtin: toy/corpus, max_samples: 120}}
    validation: {{builtin: toy/corpus, split: validation, max_samples: 8}}
    max_seq_len: 32
    train: {{max_steps: {steps}, lr: 3e-3, batch_size: 4, log_every_steps: 1,
             save_every_steps: {save}, precision: fp32, fused_adamw: false}}
  ft:
    kind: finetune
    task: causal_lm
    from: pre
    # 8 rows: a multiple of the global batch, so no rank pads its last batch with a repeat.
    data: {{files: [{ft_data}]}}
    validation_fraction: 0
    template: "{{source}} =>"
    response_column: target
    max_seq_len: 32
    # Random order, not length groups: the length sampler's groups depend on the per-rank batch.
    train: {{max_steps: 3, lr: 3e-3, batch_size: 4, log_every_steps: 1, save_every_steps: 100,
             precision: fp32, fused_adamw: false, group_by_length: false}}
  ev:
    kind: eval
    models: [{model}]
    data: {{files: [{data}]}}
    metrics: [perplexity, exact_match]
    input_column: source
    reference_column: target
    perplexity: {{batch_size: 4}}
    generation: {{max_new_tokens: 3, batch_size: 3}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _texts(n: int) -> list[str]:
    rng = random.Random(n)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def per_example_nll(model: Any, tok: Any, texts: list[str]) -> list[tuple[str, float]]:
    """(text, summed token NLL) per text, in batches of 16 with right padding."""
    out = []
    for i in range(0, len(texts), 16):
        batch = texts[i : i + 16]
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), enc.input_ids[:, 1:], reduction="none")
        sums = (nll * enc.attention_mask[:, 1:]).sum(1)
        out += [(t, float(v)) for t, v in zip(batch, sums, strict=True)]
    return out


def _helper_results(root: Path) -> dict[str, Any]:
    """Sharded per-example scores and corpus perplexity for each size (same code on 1 or N ranks)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlsteps.stages.eval.scoring import _causal_perplexity

    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    tok = AutoTokenizer.from_pretrained(root / "model")
    tok.padding_side = "right"
    spec = SimpleNamespace(
        perplexity=SimpleNamespace(window=24, stride=12, mode="document", batch_size=32)
    )
    loaded = SimpleNamespace(model=model, tokenizer=tok)
    out: dict[str, Any] = {"rank_sizes": {}}
    for n in SIZES:
        texts = _texts(n)
        scores = map_sharded(lambda xs: per_example_nll(model, tok, xs), texts)
        with torch.no_grad():
            ppl = _causal_perplexity(spec, loaded, texts)  # type: ignore[arg-type]
            spec.perplexity.mode = "stream"  # rows joined: sharded by window, not by row
            stream = _causal_perplexity(spec, loaded, texts)  # type: ignore[arg-type]
            spec.perplexity.mode = "document"
        out[str(n)] = {
            "scores": scores,
            "perplexity": ppl.perplexity,
            "tokens": ppl.scored_tokens,
            "bytes": ppl.utf8_bytes,
            "stream": [stream.perplexity, stream.scored_tokens, stream.utf8_bytes, stream.words],
        }
        out["rank_sizes"][str(n)] = distributed.all_gather_object(len(shard_indices(n)))
    return out


def _worker(local: int, world: int, port: int, root: str, what: str) -> None:
    os.environ.update(
        RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    from mlsteps.recipe import load_recipe
    from mlsteps.runner import run_recipe

    base = Path(root)
    if what == "helpers":
        results = _helper_results(base)
        if local == 0:
            (base / "helpers2.json").write_text(json.dumps(results))
    else:
        half = ["stages.pre.train.batch_size=2", "stages.ft.train.batch_size=2"]
        recipe = load_recipe(base / "recipe.yaml", half)
        run_recipe(recipe, base / "run2", quiet=True)
    torch.distributed.destroy_process_group()


def _spawn(root: Path, what: str, world: int = 2) -> None:
    import torch.multiprocessing as mp

    args = (world, _free_port(), str(root), what)
    context = mp.spawn(_worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"distributed workers still running after {SPAWN_TIMEOUT_S}s (a hang)")


def _write_recipe(root: Path, steps: int = 5, save: int = 100) -> Path:
    path = root / "recipe.yaml"
    path.write_text(
        RECIPE.format(
            tok=root / "model", model=root / "model", data=root / "eval.jsonl",
            ft_data=root / "ft.jsonl",
            steps=steps, save=save,
        ),
        encoding="utf-8",
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 + BPE tokenizer (model/), eval rows and the recipe."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlsteps.context import StageContext
    from mlsteps.recipe.specs.tokenizer import TokenizerSpec
    from mlsteps.stages import tokenizer

    root = tmp_path_factory.mktemp("dist")
    ctx = StageContext(run_dir=root, stage="tok", kind="tokenizer", seed=0, quiet=True)
    spec = TokenizerSpec.model_validate(
        {"kind": "tokenizer", "data": {"builtin": "toy/corpus", "max_samples": 300},
         "vocab_size": 300, "target": "clm"}
    )  # fmt: skip
    tokenizer.run(spec, ctx)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctx.final_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"text": t, "source": t, "target": " ".join(reversed(t.split()))} for t in _texts(7)]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"source": t, "target": " ".join(reversed(t.split()))} for t in _texts(8)]
    (root / "ft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    _write_recipe(root)
    return root


@pytest.fixture(scope="module")
def helpers(assets: Path) -> Path:
    """Sharded scoring of 7, 40 and 101 examples on 1 process (here) and on 2 processes."""
    assert not distributed.is_distributed()
    (assets / "helpers1.json").write_text(json.dumps(_helper_results(assets)))
    _spawn(assets, "helpers")
    return assets


@pytest.fixture(scope="module")
def runs(assets: Path) -> Path:
    """The same recipe on 1 process (here, batch 4) and on 2 processes (batch 2 each)."""
    from mlsteps.recipe import load_recipe
    from mlsteps.runner import run_recipe

    assert not distributed.is_distributed()
    run_recipe(load_recipe(assets / "recipe.yaml"), assets / "run1", quiet=True)
    _spawn(assets, "recipe")
    return assets


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(run_dir: Path, stage: str = "pre") -> dict[int, float]:
    records = [r for r in _jsonl(run_dir / stage / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "rank 0 alone writes metrics.jsonl: each step once"
    return {r["step"]: r["loss"] for r in records}


# ---------------------------------------------------------------------------- fast, no processes


@pytest.mark.parametrize("n", [0, 1, 7, 40, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_index_exactly_once(n: int, world: int) -> None:
    shards = [list(shard_indices(n, r, world)) for r in range(world)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_distributed_spec_maps_onto_trainer_settings() -> None:
    fsdp = FsdpSpec(sharding="shard_grad_op", auto_wrap="size", min_params=10, state_dict="sharded")
    config = fsdp.trainer_config()
    assert config["reshard_after_forward"] is False
    assert config["auto_wrap_policy"] == "SIZE_BASED_WRAP" and config["min_num_params"] == 10
    assert config["state_dict_type"] == "SHARDED_STATE_DICT" and config["version"] == 2
    inline = DeepSpeedSpec(zero_stage=3, offload_params=True).trainer_config()
    assert isinstance(inline, dict)
    assert inline["zero_optimization"]["stage"] == 3  # type: ignore[index]
    assert DeepSpeedSpec(config="ds.json").trainer_config() == "ds.json"
    with pytest.raises(ValueError, match="exactly one"):
        DeepSpeedSpec()
    with pytest.raises(ValueError, match="not both"):
        DistributedSpec(fsdp=FsdpSpec(), deepspeed=DeepSpeedSpec(zero_stage=2))


def test_bad_topology_is_a_usage_error() -> None:
    with pytest.raises(UserError, match="node-rank"):
        check_options(LaunchOptions(nproc_per_node=1, nnodes=2, node_rank=2))
    with pytest.raises(UserError, match="master-addr"):
        check_options(LaunchOptions(nproc_per_node=1, nnodes=2, node_rank=1))


# ---------------------------------------------------------------------------- one 2-rank group


def test_sharded_scores_equal_the_single_process_ones(helpers: Path) -> None:
    one = json.loads((helpers / "helpers1.json").read_text())
    two = json.loads((helpers / "helpers2.json").read_text())
    for n in map(str, SIZES):
        assert sum(two["rank_sizes"][n]) == int(n)  # no padding: nothing scored twice
        texts = [t for t, _ in two[n]["scores"]]
        assert texts == _texts(int(n))  # gathered back in input order
        for (_, a), (_, b) in zip(one[n]["scores"], two[n]["scores"], strict=True):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
        assert two[n]["tokens"] == one[n]["tokens"] and two[n]["bytes"] == one[n]["bytes"]
        assert two[n]["perplexity"] == pytest.approx(one[n]["perplexity"], rel=1e-6)
        assert two[n]["stream"][1:] == one[n]["stream"][1:]  # tokens, bytes, words
        assert two[n]["stream"][0] == pytest.approx(one[n]["stream"][0], rel=1e-6)


# The recipe runs below take 1.5-2.5 min on the shared 2-core CI box (two spawned ranks importing the
# HF stack and training under load), over the fast tier's budget: they run under `make soak`.


@pytest.mark.slow
def test_two_ranks_reproduce_the_single_process_loss_curve(runs: Path) -> None:
    one, two = _losses(runs / "run1"), _losses(runs / "run2")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    m1 = json.loads((runs / "run1" / "metrics.json").read_text())["pre"]
    m2 = json.loads((runs / "run2" / "metrics.json").read_text())["pre"]
    assert m1["global_batch_size"] == m2["global_batch_size"] == 4
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_two_ranks_reproduce_the_single_process_finetune(runs: Path) -> None:
    """SFT from the pretrained stage: data prepared rank-0-first, the same loss curve."""
    one, two = _losses(runs / "run1", "ft"), _losses(runs / "run2", "ft")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step


@pytest.mark.slow
def test_rank_zero_writes_the_run_directory(runs: Path) -> None:
    run2 = runs / "run2"
    state = json.loads((run2 / "state.json").read_text())
    assert {s["status"] for s in state["stages"].values()} == {"done"}
    assert (run2 / "pre" / "final" / "model.safetensors").is_file()
    assert not list(run2.glob("**/*.tmp")) and not (run2 / "pre" / "final.tmp").exists()
    assert len(_jsonl(run2 / "ev" / "predictions.jsonl")) == 7


@pytest.mark.slow
def test_eval_stage_on_two_ranks_equals_one(runs: Path) -> None:
    m1 = json.loads((runs / "run1" / "metrics.json").read_text())["ev"]
    m2 = json.loads((runs / "run2" / "metrics.json").read_text())["ev"]
    assert m1.keys() == m2.keys()
    for label in m1:
        assert m2[label]["perplexity"] == pytest.approx(m1[label]["perplexity"], rel=1e-6)
        assert m2[label]["perplexity_tokens"] == m1[label]["perplexity_tokens"]
        assert m2[label]["exact_match"] == m1[label]["exact_match"]
    p1 = _jsonl(runs / "run1" / "ev" / "predictions.jsonl")
    p2 = _jsonl(runs / "run2" / "ev" / "predictions.jsonl")
    assert p1 == p2 and [r["index"] for r in p2] == list(range(7))


# ---------------------------------------------------------------------------- launcher (slow)


def _mlsteps(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, "-m", "mlsteps", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_two_nodes_on_localhost(assets: Path, tmp_path: Path) -> None:
    port = str(_free_port())
    common = ["run", str(assets / "recipe.yaml"), "--run-dir", str(tmp_path / "run"),
              "--nproc-per-node", "1", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", port, "--only", "pre", "stages.pre.train.batch_size=2"]  # fmt: skip
    nodes = [_mlsteps(*common, "--node-rank", str(r)) for r in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["pre"]
    assert (m["world_size"], m["global_batch_size"]) == (2, 4)


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the worker processes started by a launcher."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(child)
    return found


@pytest.mark.slow
def test_killed_rank_fails_fast_and_rerun_resumes(assets: Path, tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path, steps=30, save=2)
    (tmp_path / "model").symlink_to(assets / "model")
    (tmp_path / "eval.jsonl").symlink_to(assets / "eval.jsonl")
    args = ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", "2",
            "stages.pre.train.batch_size=2", "~stages.ft", "~stages.ev"]  # fmt: skip
    launcher = _mlsteps(*args)
    checkpoints = tmp_path / "run" / "pre" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("checkpoint-*/COMPLETE")):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, err
    assert time.monotonic() - killed_at < 90, "a dead rank must not hang the run"
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["pre"]["status"] in ("failed", "running")

    rerun = _mlsteps(*args)
    _, err = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, err
    assert "resuming from checkpoint-" in err
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["pre"]["status"] == "done" and state["stages"]["pre"]["resumed"]
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 31))
