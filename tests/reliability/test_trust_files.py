"""Files that are not what they claim (docs/reliability.md, "Files that are not what they claim").

Data files that are FIFOs, devices or symlink loops; model directories with a truncated
tokenizer.json or model.safetensors, or a pickle under the safetensors name; checkpoints whose
weights were overwritten in place; csv files without a header; UTF-16/32 text; a null value whose
place must be given as the line of the file, not a row number after a shuffle.

Every case is a user-fixable problem: exit 2, one ``error:`` line naming the file and the fix,
no traceback, no hang (a FIFO opened for reading blocks forever, so those cases run under an
alarm). The runs append one stage to a finished ``tok -> pre`` run, as test_bad_inputs does.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from relkit import MINI, cli, copy_run, read_json, tree_hashes

from mlsteps.errors import UserError


class Hung(BaseException):
    """Raised by the alarm; a BaseException so that no ``except OSError`` turns it into a
    clean-looking error message."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted by SIGALRM."""

    def hung(*_: object) -> None:
        raise Hung(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    """A finished tok -> pre run (gpt2, 2 layers, width 32; checkpoints 6 and 8 kept)."""
    root = tmp_path_factory.mktemp("trust")
    (root / "mini.yaml").write_text(MINI, encoding="utf-8")
    res = cli("run", root / "mini.yaml", "--run-dir", root / "run")
    assert res.code == 0, res.err[-3000:]
    return root / "run"


def run_stage(base: Path, tmp_path: Path, stage: str) -> tuple[int, list[str], str]:
    """Append ``stage`` (YAML under ``stages:``) to a copy of ``base`` and run it."""
    run_dir = copy_run(base, tmp_path / "run")
    before = {k: v for k, v in tree_hashes(run_dir).items() if k.startswith(("tok/", "pre/"))}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MINI.rstrip("\n") + "\n" + stage, encoding="utf-8")
    with deadline(60):
        res = cli("run", recipe, "--run-dir", run_dir)
    after = {k: v for k, v in tree_hashes(run_dir).items() if k.startswith(("tok/", "pre/"))}
    assert after == before, "earlier stages changed"
    assert "Traceback" not in res.err, res.err[-3000:]
    return res.code, res.error_lines, res.err


def finetune(data: str, source: str = "pre", extra: str = "") -> str:
    return (
        "  ft:\n    kind: finetune\n    task: causal_lm\n"
        f"    from: {source}\n    data: {data}\n"
        "    prompt_column: source\n    response_column: target\n    max_seq_len: 32\n"
        f"    validation_fraction: 0.1\n    train: {{max_steps: 1}}\n{extra}"
    )


# ---------------------------------------------------------------- not a regular file


def _symlink_loop(tmp: Path) -> Path:
    path = tmp / "loop.jsonl"
    path.symlink_to(path.name)
    return path


def _fifo(tmp: Path) -> Path:
    path = tmp / "pipe.jsonl"
    os.mkfifo(path)
    return path


def _device(tmp: Path) -> Path:
    path = tmp / "zeros.jsonl"
    path.symlink_to("/dev/zero")  # never ends
    return path


NOT_REGULAR = {
    "symlink-loop": (_symlink_loop, "symlink loop"),
    "fifo": (_fifo, "FIFO"),
    "device": (_device, "character device"),
}


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_data_file_that_is_not_a_regular_file(base: Path, tmp_path: Path, kind: str) -> None:
    make, words = NOT_REGULAR[kind]
    path = make(tmp_path)
    # The format is given: the device's own name (zero) has no extension to refuse it by.
    code, errors, err = run_stage(base, tmp_path, finetune(f"{{files: [{path}], format: jsonl}}"))
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and errors == [err.strip().splitlines()[-1]], err[-2000:]
    assert "stages.ft.data" in errors[0] and str(path) in errors[0] and words in errors[0]


def _damaged_copy(base: Path, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of pre/final with one file damaged; returns (dir, the damaged file's name)."""
    model = tmp_path / f"model-{damage}"
    shutil.copytree(base / "pre" / "final", model)
    if damage == "tokenizer-truncated":
        name = "tokenizer.json"
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])
    elif damage == "weights-truncated":
        name = "model.safetensors"
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) * 2 // 3])
    elif damage == "weights-pickle":
        import torch
        from safetensors.torch import load

        name = "model.safetensors"
        # From bytes, not load_file: its tensors map the file that torch.save then truncates.
        torch.save(load((model / name).read_bytes()), model / name)
    elif damage == "config-fifo":
        name = "config.json"
        (model / name).unlink()
        os.mkfifo(model / name)
    else:
        raise AssertionError(damage)
    return model, name


STAGES_LOADING = {
    "finetune-from": lambda m: finetune("{builtin: toy/translate, max_samples: 8}", str(m)),
    "finetune-tokenizer": lambda m: finetune(
        "{builtin: toy/translate, max_samples: 8}", "pre", f"    tokenizer: {m}\n"
    ),
    "pretrain-tokenizer": lambda m: (
        f"  pre2:\n    kind: pretrain\n    objective: clm\n    tokenizer: {m}\n"
        "    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 64}\n"
        "    data: {builtin: toy/corpus, max_samples: 20}\n    max_seq_len: 32\n"
        "    train: {max_steps: 1}\n"
    ),
    "prompt-from": lambda m: (
        f"  zs:\n    kind: prompt\n    method: zero_shot\n    from: {m}\n"
        '    template: "{source} ="\n'
    ),
    "eval-models": lambda m: (
        f"  ev:\n    kind: eval\n    models: [{m}]\n"
        "    data: {builtin: toy/translate, split: test, max_samples: 2}\n"
        "    metrics: [chrf]\n    generation: {max_new_tokens: 2}\n"
    ),
    "predict-model": lambda m: (
        f"  pred:\n    kind: predict\n    model: {m}\n"
        "    data: {builtin: toy/translate, split: test, max_samples: 2}\n"
        "    generation: {max_new_tokens: 2}\n"
    ),
}
_WEIGHT_PATHS = ("finetune-from", "prompt-from", "eval-models", "predict-model")
DAMAGE_CASES = [(d, p) for d in ("tokenizer-truncated", "config-fifo") for p in STAGES_LOADING] + [
    (d, p) for d in ("weights-truncated", "weights-pickle") for p in _WEIGHT_PATHS
]


@pytest.mark.parametrize(("damage", "path"), DAMAGE_CASES)
def test_damaged_model_directory_names_the_file(
    base: Path, tmp_path: Path, damage: str, path: str
) -> None:
    model, name = _damaged_copy(base, tmp_path, damage)
    code, errors, err = run_stage(base, tmp_path, STAGES_LOADING[path](model))
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and errors == [err.strip().splitlines()[-1]], err[-2000:]
    line = errors[0]
    assert str(model / name) in line, line
    assert line.rstrip().endswith(")"), f"no fix given: {line}"  # "(<how to fix>)"
    assert len(line) < 400, line
    if damage == "weights-pickle":
        assert "pickle" in line and "safe_serialization=True" in line


# ---------------------------------------------------------------- checkpoints damaged in place


def _overwrite_with_nan(weights: Path) -> None:
    """Write NaN over every float32 tensor of a safetensors file; its size stays the same."""
    raw = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    nan = struct.pack("<f", float("nan"))
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"] == "F32":
            start, end = (8 + header_len + o for o in entry["data_offsets"])
            raw[start:end] = nan * ((end - start) // 4)
    size = weights.stat().st_size
    weights.write_bytes(bytes(raw))
    assert weights.stat().st_size == size


def _interrupted_copy(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``base`` whose pre stage looks interrupted after checkpoint-8 (no final/)."""
    run_dir = copy_run(base, tmp_path / "run")
    state = read_json(run_dir / "state.json")
    state["stages"]["pre"].update(status="failed", interrupted=True)
    (run_dir / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run_dir / "pre" / "final")
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI, encoding="utf-8")
    return run_dir, recipe


def test_checkpoint_weights_damaged_in_place_are_not_resumed(base: Path, tmp_path: Path) -> None:
    """NaN written over checkpoint-8's weights (same size, valid header): the manifest's sha256
    rejects it, checkpoint-6 is resumed and the result equals the uninterrupted run."""
    run_dir, recipe = _interrupted_copy(base, tmp_path)
    ckpts = run_dir / "pre" / "checkpoints"
    assert "sha256" in read_json(ckpts / "checkpoint-8" / "COMPLETE")
    _overwrite_with_nan(ckpts / "checkpoint-8" / "model.safetensors")
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert (
        "ignoring and removing checkpoint-8: model.safetensors does not match its sha256" in res.err
    )
    assert "[pre] resuming from checkpoint-6" in res.err
    assert tree_hashes(run_dir / "pre" / "final") == tree_hashes(base / "pre" / "final")


def test_old_manifest_without_checksums_still_resumes(base: Path, tmp_path: Path) -> None:
    """Run directories written before checksums existed keep resuming (size checks only).
    A guard: this held before checksums were added and must keep holding."""
    run_dir, recipe = _interrupted_copy(base, tmp_path)
    marker = run_dir / "pre" / "checkpoints" / "checkpoint-8" / "COMPLETE"
    manifest = read_json(marker)
    manifest.pop("sha256", None)
    marker.write_text(json.dumps(manifest))
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert "[pre] resuming from checkpoint-8" in res.err
    assert tree_hashes(run_dir / "pre" / "final") == tree_hashes(base / "pre" / "final")


# ---------------------------------------------------------------- headers, encodings, nulls


def _load(tmp_path: Path, **spec: object) -> object:
    from mlsteps.engine.data import load_rows
    from mlsteps.errors import field_scope
    from mlsteps.recipe.specs.data import DataSpec

    with field_scope("stages.ft.data"):
        return load_rows(DataSpec(**spec), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ","), (".tsv", "\t")])
def test_headerless_table_says_so_and_shows_how_to_name_columns(
    tmp_path: Path, suffix: str, sep: str
) -> None:
    from mlsteps.engine.data import require_columns

    path = tmp_path / f"pairs{suffix}"
    path.write_text("".join(f"hello {i}{sep}world {i}\n" for i in range(20)), encoding="utf-8")
    ds = _load(tmp_path, files=[str(path)], shuffle_seed=1)
    with pytest.raises(UserError) as info:
        require_columns(ds, ["source", "target"])  # type: ignore[arg-type]
    text = str(info.value)
    assert str(path) in text and "no header row" in text and "hello 0, world 0" in text
    assert "columns: [source, target]" in text
    # ... and that fix works:
    named = _load(tmp_path, files=[str(path)], columns=["source", "target"])
    assert named[0] == {"source": "hello 0", "target": "world 0"}  # type: ignore[index]


def test_a_real_header_with_another_column_keeps_the_plain_message(tmp_path: Path) -> None:
    """A header of names ('sentence', 'label') is not suspected: the fix there is the option."""
    from mlsteps.engine.data import require_columns

    path = tmp_path / "named.csv"
    path.write_text("sentence,label\na fine film,1\nawful,0\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        require_columns(_load(tmp_path, files=[str(path)]), ["text"])  # type: ignore[arg-type]
    assert "header" not in str(info.value) and "set the *_column option" in str(info.value)


BOM_CASES = {
    "utf-16-le": (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16LE", "iconv -f UTF-16 -t UTF-8"),
    "utf-16-be": (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16BE", "iconv -f UTF-16 -t UTF-8"),
    "utf-32-le": (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32LE", "iconv -f UTF-32 -t UTF-8"),
    "utf-32-be": (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32BE", "iconv -f UTF-32 -t UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BOM_CASES))
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_utf16_and_utf32_files_are_named_with_the_right_iconv(
    tmp_path: Path, case: str, suffix: str
) -> None:
    bom, codec, name, command = BOM_CASES[case]
    text = {"jsonl": '{"source": "héllo", "target": "wörld"}\n', "csv": "source,target\nhé,wö\n"}
    path = tmp_path / f"data{suffix}"
    path.write_bytes(bom + text.get(suffix[1:], "héllo wörld\n").encode(codec))
    with pytest.raises(UserError) as info:
        _load(tmp_path, files=[str(path)])
    message = str(info.value)
    assert str(path) in message and name in message and command in message, message
    assert "latin1" not in message


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".txt"])
def test_utf8_with_bom_is_read_correctly(tmp_path: Path, suffix: str) -> None:
    text = {
        ".jsonl": '{"source": "héllo", "target": "wörld"}\n',
        ".csv": "source,target\nhéllo,wörld\n",
        ".tsv": "source\ttarget\nhéllo\twörld\n",
        ".txt": "héllo wörld\n",
    }[suffix]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    rows = list(_load(tmp_path, files=[str(path)]))  # type: ignore[call-overload]
    expected = (
        {"text": "héllo wörld"} if suffix == ".txt" else {"source": "héllo", "target": "wörld"}
    )
    assert rows == [expected]


def _rows_with_null(n: int, null_at: int) -> list[dict[str, str | None]]:
    rows: list[dict[str, str | None]] = [
        {"source": f"hello {i}", "target": f"world {i}"} for i in range(n)
    ]
    rows[null_at]["target"] = None
    return rows


def test_null_value_is_reported_by_file_line_after_a_shuffle(base: Path, tmp_path: Path) -> None:
    """The null is on line 78; the validation split shuffles the rows first."""
    path = tmp_path / "pairs.jsonl"
    rows = _rows_with_null(200, 77)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, errors, err = run_stage(base, tmp_path, finetune(str(path)))
    assert code == 2, err[-2000:]
    assert errors == [err.strip().splitlines()[-1]], err[-2000:]
    assert f"{path}:78: column 'target' has no value" in errors[0], errors[0]


@pytest.mark.parametrize(
    ("suffix", "line"), [(".csv", 79), (".tsv", 79), (".jsonl", 80), (".json", None)]
)
def test_null_value_located_in_each_format(tmp_path: Path, suffix: str, line: int | None) -> None:
    """Row 78 (1-based) of the data: line 79 under a header row; in the jsonl file two blank
    lines come first; a JSON array has records, not lines. A shuffle and a row slice come first."""
    rows = _rows_with_null(200, 77)
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("\n \n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        sep = "," if suffix == ".csv" else "\t"
        body = "".join(f"{r['source']}{sep}{r['target'] or ''}\n" for r in rows)
        path.write_text(f"source{sep}target\n" + body, encoding="utf-8")
    from mlsteps.engine.data import load_rows
    from mlsteps.errors import field_scope
    from mlsteps.recipe.specs.data import DataSpec

    spec = DataSpec(files=[str(path)], shuffle_seed=5, rows="10:")
    with pytest.raises(UserError) as info:
        with field_scope("d"):
            load_rows(spec, cache_dir=tmp_path / "c", required=["source", "target"])
    where = f"{path}:{line}" if line else f"{path}, row 78"
    assert f"{where}: column 'target' has no value" in str(info.value), str(info.value)
    # A null in a row that 'max_samples' or 'rows' leaves out is no error, and no column is added.
    kept = load_rows(
        DataSpec(files=[str(path)], rows=":50"), cache_dir=tmp_path / "c",
        required=["target"],
    )  # fmt: skip
    assert kept.num_rows == 50 and kept.column_names == ["source", "target"]


EVAL_OR_PREDICT = {
    "eval": "  ev:\n    kind: eval\n    models: [pre]\n    data: {data}\n    metrics: [chrf]\n"
    "    generation: {{max_new_tokens: 2}}\n",
    "predict": "  pred:\n    kind: predict\n    model: pre\n    data: {data}\n"
    "    generation: {{max_new_tokens: 2}}\n",
}


@pytest.mark.parametrize(
    ("stage", "column"), [("eval", "target"), ("eval", "source"), ("predict", "source")]
)
def test_null_value_in_eval_and_predict_data_by_file_line(
    base: Path, tmp_path: Path, stage: str, column: str
) -> None:
    """Eval and predict data shuffled by shuffle_seed: the null's line, not its new row number."""
    rows = _rows_with_null(30, 0)
    rows[0]["target"], rows[20][column] = "world 0", None
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = f"{{files: [{path}], shuffle_seed: 3}}"
    code, errors, err = run_stage(base, tmp_path, EVAL_OR_PREDICT[stage].format(data=data))
    assert code == 2, err[-2000:]
    assert errors == [err.strip().splitlines()[-1]], err[-2000:]
    assert f"{path}:21: column '{column}' has no value" in errors[0], errors[0]
