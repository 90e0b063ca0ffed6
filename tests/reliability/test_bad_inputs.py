"""A corpus of bad inputs: each gives exit 2 (1 for a runtime fault), one line on stderr that
names the place and the fix, no traceback, and leaves earlier results byte for byte untouched.

Two families:

- *before work* (``RECIPE_CASES``): YAML traps, unknown keys/kinds/stages, references, types,
  sizes, files, CLI flags. They run against a copy of a finished run directory, which must come
  out byte-identical (not even recipe.yaml is rewritten), and stderr must be that one line only.
- *while running* (``RUNTIME_CASES``): data and model problems only a stage can see. A bad stage
  is appended to a finished run of the first stages (tok, pre); they are skipped and their files,
  state and metrics must be unchanged. Progress lines may precede the single ``error:`` line.
  A representative third runs in the fast suite, the rest under ``slow``.

Everything runs in this process (``mlsteps.cli.main``): no torch import per case.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relkit import MINI, PIPELINE, PYTHON, cli, copy_run, read_json, subprocess_env, tree_hashes


@dataclass
class Case:
    id: str
    code: int
    expect: tuple[str, ...]  # substrings of the error line: the place and the fix
    recipe: str | None = None  # whole recipe text (default: PIPELINE with the edits below)
    replace: tuple[tuple[str, str], ...] = ()  # (old, new) edits of PIPELINE, each must apply
    append: str = ""  # stage(s) appended under `stages:`
    files: dict[str, bytes | None] = field(default_factory=dict)  # name -> bytes (None: a dir)
    args: tuple[str, ...] = ()  # extra CLI args after the recipe
    recipe_arg: str | None = None  # use this instead of the written recipe file
    command: str = "run"

    base: str = PIPELINE

    def text(self, tmp: Path) -> str:
        text = self.recipe if self.recipe is not None else self.base
        for old, new in self.replace:
            assert old in text, f"{self.id}: edit target {old!r} not in the recipe"
            text = text.replace(old, new, 1)
        if self.append:
            text = text.rstrip("\n") + "\n" + self.append
        return text.replace("{tmp}", str(tmp))


TOK = "    vocab_size: 300\n"
PRE_TRAIN = "    train: {max_steps: 8}\n"

RECIPE_CASES = [
    # --- YAML traps
    Case("yaml-no-as-false", 2, ("(stages.ev.target_lang)", "quote it", "'no'"),
         replace=(("    metrics: [chrf, exact_match]\n", "    metrics: [chrf, exact_match]\n    target_lang: no\n"),)),
    Case("yaml-3.10-as-float", 2, ("(name)", "quote it", "'3.10'"), replace=(("name: rel", "name: 3.10"),)),
    Case("yaml-octal-010", 2, ("recipe.yaml", "(stages.tok.vocab_size)", "010"), replace=((TOK, "    vocab_size: 010\n"),)),
    Case("yaml-duplicate-key", 2, ("duplicate key 'vocab_size'", "remove one"),
         replace=((TOK, TOK + "    vocab_size: 400\n"),)),
    Case("yaml-duplicate-stage", 2, ("duplicate key 'tok'",),
         append="  tok:\n    kind: tokenizer\n    data: builtin:toy/corpus\n"),
    Case("yaml-python-tag", 2, ("tag", "not allowed", "remove the tag"),
         replace=(("name: rel", "name: !!python/object/apply:os.system ['touch {tmp}/PWNED']"),)),
    Case("yaml-custom-tag", 2, ("tag '!env'", "not allowed"), replace=((TOK, "    vocab_size: !env VOCAB\n"),)),
    Case("yaml-merge-key", 2, ("merge keys",),
         replace=(("  tok:\n", "  tok:\n    <<: {min_frequency: 3}\n"),)),
    Case("yaml-syntax", 2, ("invalid YAML", "recipe.yaml:"), replace=(("  pre:\n", "  pre: [\n"),)),
    Case("yaml-tab-indent", 2, ("invalid YAML", "recipe.yaml:"), replace=((TOK, "\tvocab_size: 300\n"),)),
    Case("yaml-not-a-mapping", 2, ("must be a mapping",), recipe="- tok\n- pre\n"),
    Case("yaml-scalar-recipe", 2, ("must be a mapping",), recipe="just text\n"),
    # --- unknown keys, kinds, stage names, references
    Case("unknown-top-key", 2, ("unknown key 'stage'", "did you mean 'stages'"),
         replace=(("seed: 7", "seed: 7\nstage: {}"),)),
    Case("unknown-stage-key", 2, ("(stages.tok.vocab_sise)", "did you mean 'vocab_size'"),
         replace=((TOK, "    vocab_sise: 300\n"),)),
    Case("unknown-nested-key", 2, ("(stages.pre.train.max_step)", "did you mean 'max_steps'"),
         replace=((PRE_TRAIN, "    train: {max_step: 8}\n"),)),
    Case("unknown-kind", 2, ("(stages.pre.kind)", "unknown stage kind 'pretrian'", "did you mean 'pretrain'"),
         replace=(("    kind: pretrain\n", "    kind: pretrian\n"),)),
    Case("missing-kind", 2, ("stages.pre", "no 'kind'", "add kind"),
         replace=(("    kind: pretrain\n", ""),)),
    Case("unknown-defaults-key", 2, ("defaults.trian", "did you mean 'train'"),
         replace=(("defaults:\n  train:", "defaults:\n  trian:"),)),
    Case("forward-reference", 2, ("(stages.pre.tokenizer)", "later stage", "move 'ppl' before 'pre'"),
         replace=(("    tokenizer: tok\n", "    tokenizer: ppl\n"),)),
    Case("self-reference", 2, ("(stages.sft.from)", "refers to itself"), replace=(("    from: pre\n", "    from: sft\n"),)),
    Case("misspelled-stage-ref", 2, ("(stages.pre.tokenizer)", "unknown stage 'tokk'", "did you mean 'tok'"),
         replace=(("    tokenizer: tok\n", "    tokenizer: tokk\n"),)),
    Case("unknown-metric", 2, ("(stages.ev)", "unknown metric 'chrF++' at metrics.0", "did you mean 'chrf'"),
         replace=(("[chrf, exact_match]", "[chrF++, exact_match]"),)),
    Case("from-unknown-stage", 2, ("--from", "no stage named 'sfft'", "did you mean 'sft'"), args=("--from", "sfft")),
    Case("from-and-only", 2, ("cannot be combined",), args=("--from", "sft", "--only", "ev")),
    # --- wrong types, zero / negative sizes
    Case("type-max-steps-text", 2, ("(stages.pre.train.max_steps)", "integer", '"ten"'),
         replace=((PRE_TRAIN, "    train: {max_steps: ten}\n"),)),
    Case("type-stages-list", 2, ("(stages)", "dictionary"),
         recipe="name: x\nstages:\n  - {kind: tokenizer, data: 'builtin:toy/corpus'}\n"),
    Case("type-models-string", 2, ("(stages.ev.models)", "list"), replace=(("    models: [pre, sft]\n", "    models: pre\n"),)),
    Case("zero-batch-size", 2, ("(stages.pre.train.batch_size)", "greater than 0"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, batch_size: 0}\n"),)),
    Case("negative-lr", 2, ("(stages.pre.train.lr)", "greater than 0"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, lr: -1.0e-3}\n"),)),
    Case("negative-max-steps", 2, ("(stages.pre.train.max_steps)", "greater than 0"),
         replace=((PRE_TRAIN, "    train: {max_steps: -8}\n"),)),
    Case("zero-vocab", 2, ("(stages.tok.vocab_size)", "greater than 0"), replace=((TOK, "    vocab_size: 0\n"),)),
    Case("validation-fraction-1.5", 2, ("(stages.pre.validation_fraction)", "less than 1"),
         replace=(("    validation_fraction: 0.1\n    max_seq_len: 32\n", "    validation_fraction: 1.5\n    max_seq_len: 32\n"),)),
    Case("seq-len-over-positions", 2, ("(stages.pre", "max_seq_len 512 exceeds model.max_positions 256"),
         replace=(("    max_seq_len: 32\n", "    max_seq_len: 512\n"),)),
    Case("heads-do-not-divide", 2, ("(stages.pre.model", "n_heads (3) must divide hidden_size (32)"),
         replace=(("n_heads: 2, max_positions: 256", "n_heads: 3, max_positions: 256"),)),
    Case("mlm-with-gpt2", 2, ("(stages.pre", "objective mlm needs an encoder family"),
         replace=(("    objective: clm\n", "    objective: mlm\n"),)),
    Case("data-two-sources", 2, ("(stages.tok.data", "exactly one of 'files', 'hub', 'builtin'", "got files, builtin"),
         replace=(("{builtin: toy/corpus, max_samples: 300}", "{builtin: toy/corpus, files: [a.txt]}"),)),
    Case("empty-stages", 2, ("(stages)", "at least one stage"), recipe="name: x\nstages: {}\n"),
    # --- names that would escape the run directory
    Case("run-name-dotdot", 2, ("(name)", "one path component"), replace=(("name: rel", "name: ../escape"),)),
    Case("run-name-absolute", 2, ("(name)", "one path component"), replace=(("name: rel", "name: /tmp/escape"),)),
    Case("stage-name-slash", 2, ("a/b", "one path component"), append="  a/b:\n    kind: tokenizer\n    data: builtin:toy/corpus\n"),
    Case("stage-name-dotdot", 2, ("'..'", "one path component"), append="  ..:\n    kind: tokenizer\n    data: builtin:toy/corpus\n"),
    # --- files
    Case("missing-data-file", 2, ("stages.tok.data", "not found", "check the path"),
         replace=(("{builtin: toy/corpus, max_samples: 300}", "{files: [{tmp}/nope.txt]}"),)),
    Case("recipe-missing", 2, ("file not found", "check the path"), recipe_arg="{tmp}/missing.yaml"),
    Case("recipe-is-dir", 2, ("is a directory",), recipe_arg="{tmp}/adir", files={"adir": None}),
    Case("recipe-empty", 2, ("file is empty", "write a recipe"), recipe=""),
    Case("recipe-not-utf8", 2, ("not UTF-8", "save the file as UTF-8"), recipe_arg="{tmp}/latin1.yaml",
         files={"latin1.yaml": "name: caf\u00e9\nstages: {}\n".encode("latin-1")}),
    # --- overrides and flags
    Case("override-no-equals", 2, ("stages.pre.train.max_steps", "KEY=VALUE"), args=("stages.pre.train.max_steps",)),
    Case("override-remove-missing", 2, ("nothing at", "remove"), args=("~stages.pre.train.nope",)),
    Case("override-octal", 2, ("ambiguous number '08'",), args=("stages.pre.train.max_steps=08",)),
    Case("override-tag", 2, ("tag", "not allowed"), args=("name=!!python/name:os.system",)),
    Case("validate-bad-recipe", 2, ("(stages.tok.vocab_sise)",), replace=((TOK, "    vocab_sise: 300\n"),), command="validate"),
]  # fmt: skip


def _materialize(case: Case, tmp: Path) -> Path:
    for name, content in case.files.items():
        path = tmp / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(content)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(case.text(tmp), encoding="utf-8")
    return Path(case.recipe_arg.replace("{tmp}", str(tmp))) if case.recipe_arg else recipe


def assert_one_clear_line(res, case: Case, *, only_line: bool) -> str:  # type: ignore[no-untyped-def]
    assert res.code == case.code, f"{case.id}: exit {res.code}, stderr:\n{res.err[-2500:]}"
    assert "Traceback" not in res.err, f"{case.id}: traceback on stderr:\n{res.err[-2500:]}"
    errors = res.error_lines
    assert len(errors) == 1, f"{case.id}: expected one error line, got:\n{res.err[-2500:]}"
    if only_line:
        assert res.err_lines == errors, f"{case.id}: more than the error on stderr:\n{res.err}"
    line = errors[0]
    for part in case.expect:
        assert part in line, f"{case.id}: {part!r} missing from: {line}"
    return line


@pytest.fixture(scope="module")
def finished_copy(reference_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory that every recipe-level case must leave byte-identical."""
    return copy_run(reference_run, tmp_path_factory.mktemp("finished") / "run")


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_bad_recipe_is_refused_before_work(case: Case, tmp_path: Path, finished_copy: Path) -> None:
    recipe = _materialize(case, tmp_path)
    before = tree_hashes(finished_copy)
    extra = ("--run-dir", finished_copy) if case.command == "run" else ()
    res = cli(case.command, recipe, *case.args, *extra)
    assert_one_clear_line(res, case, only_line=True)
    assert tree_hashes(finished_copy) == before, f"{case.id}: the finished run directory changed"
    assert not (tmp_path / "PWNED").exists(), "a YAML tag executed code"
    assert not (tmp_path / "runs").exists()


def test_recipe_corpus_is_large_enough() -> None:
    assert len(RECIPE_CASES) + len(RUNTIME_CASES) >= 40
    assert len({c.id for c in RECIPE_CASES + RUNTIME_CASES}) == len(RECIPE_CASES + RUNTIME_CASES)


# ------------------------------------------------------------------ while running

LATIN1 = "caf\u00e9 au lait\n".encode("latin-1") * 3
RUNTIME_CASES = [
    Case("data-empty-file", 2, ("stages.bad.data", "is empty", "point at a file with text"),
         files={"empty.txt": b""},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/empty.txt\n    metrics: [perplexity]\n"),
    Case("data-blank-lines-only", 2, ("stages.bad.data", "is empty"), files={"blank.txt": b"\n  \n\n"},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/blank.txt\n    metrics: [perplexity]\n"),
    Case("data-not-utf8", 2, ("stages.bad.data", "not valid UTF-8", "byte offset 3", "re-encode"),
         files={"latin1.txt": LATIN1},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/latin1.txt\n    metrics: [perplexity]\n"),
    Case("data-dir-not-file", 2, ("stages.bad.data", "is a directory", "glob"), files={"ddir": None},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/ddir\n    metrics: [perplexity]\n"),
    Case("data-bad-jsonl", 2, ("stages.bad.data", "bad.jsonl:2", "invalid JSON"),
         files={"bad.jsonl": b'{"text": "fine"}\n{"text": oops}\n'},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/bad.jsonl\n    metrics: [perplexity]\n"),
    Case("data-json-not-rows", 2, ("stages.bad.data", "array of objects"), files={"rows.json": b'{"a": 1}'},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/rows.json\n    metrics: [perplexity]\n"),
    Case("data-unknown-format", 2, ("stages.bad.data", "cannot tell the format", "set 'format'"),
         files={"rows.xml": b"<a/>"},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/rows.xml\n    metrics: [perplexity]\n"),
    Case("missing-column-eval", 2, ("stages.bad", "column 'text' not found", "source, target"),
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {builtin: toy/translate, max_samples: 4}\n    metrics: [perplexity]\n"),
    Case("missing-column-finetune", 2, ("stages.bad.data", "column 'prompt' not found"),
         append="  bad:\n    kind: finetune\n    task: causal_lm\n    from: pre\n    data: {builtin: toy/corpus, max_samples: 8}\n"),
    Case("missing-column-predict", 2, ("stages.bad.data", "column 'question' not found", "set the *_column option"),
         append="  bad:\n    kind: predict\n    model: pre\n    input_column: question\n    data: {builtin: toy/translate, max_samples: 4}\n"),
    Case("csv-missing-column", 2, ("stages.bad.data", "column 'target' not found"),
         files={"rows.csv": b"source,other\nhello,x\nworld,y\n"},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/rows.csv\n    metrics: [chrf]\n"),
    Case("labels-outside-label-set", 2, ("stages.bad.validation", "never seen in training", "training labels are"),
         append="  bad:\n    kind: finetune\n    task: classification\n    from: pre\n    data: {builtin: toy/sentiment, max_samples: 24}\n    validation: {builtin: toy/topic, split: validation, max_samples: 8}\n    train: {max_steps: 2}\n"),
    Case("labels-single-class", 2, ("stages.bad", "single label", "at least two classes"),
         files={"one.jsonl": b'{"text": "a b", "label": "x"}\n{"text": "c d", "label": "x"}\n{"text": "e f", "label": "x"}\n'},
         append="  bad:\n    kind: finetune\n    task: classification\n    from: pre\n    data: {tmp}/one.jsonl\n    validation_fraction: 0\n    train: {max_steps: 2}\n"),
    Case("reference-row-empty", 2, ("stages.bad.data", "row 1 is empty", "drop rows"),
         files={"refs.jsonl": b'{"source": "a", "target": ["x"]}\n{"source": "b", "target": []}\n'},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/refs.jsonl\n    metrics: [chrf]\n"),
    Case("reference-not-text", 2, ("stages.bad.data", "expected a string or a list of strings"),
         files={"refs.jsonl": b'{"source": "a", "target": 3}\n{"source": "b", "target": 4}\n'},
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {tmp}/refs.jsonl\n    metrics: [chrf]\n"),
    Case("metric-does-not-fit-model", 2, ("stages.bad.models.0", "accuracy", "does not fit model 'pre'"),
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {builtin: toy/sentiment, max_samples: 4}\n    metrics: [accuracy]\n"),
    Case("seq-len-over-model-positions", 2, ("stages.bad", "max_seq_len 512 exceeds the model's 256 positions", "max_seq_len <= 256"),
         append="  bad:\n    kind: finetune\n    task: causal_lm\n    from: pre\n    data: {builtin: toy/translate, max_samples: 8}\n    prompt_column: source\n    response_column: target\n    max_seq_len: 512\n"),
    Case("tokenizer-model-vocab-mismatch", 2, ("stages.bad", "embedding table has", "use the tokenizer the model was trained with"),
         append="  tok2:\n    kind: tokenizer\n    data: {builtin: toy/corpus, max_samples: 300}\n    vocab_size: 400\n"
                "  bad:\n    kind: finetune\n    task: causal_lm\n    from: pre\n    tokenizer: tok2\n    data: {builtin: toy/translate, max_samples: 8}\n    prompt_column: source\n    response_column: target\n"),
    Case("vocab-too-small", 2, ("stages.bad.vocab_size", "too small", "at least"),
         append="  bad:\n    kind: tokenizer\n    data: {builtin: toy/corpus, max_samples: 50}\n    vocab_size: 20\n"),
    Case("unknown-builtin", 2, ("stages.bad.data", "toy/corpse", "did you mean"),
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: builtin:toy/corpse\n    metrics: [perplexity]\n"),
    Case("unknown-builtin-split", 2, ("stages.bad.data", "'dev'", "train, validation, test"),
         append="  bad:\n    kind: eval\n    models: [pre]\n    data: {builtin: toy/corpus, split: dev}\n    metrics: [perplexity]\n"),
    Case("model-dir-is-a-tokenizer", 2, ("stages.bad", "not a model directory"),
         append="  bad:\n    kind: predict\n    model: {tmp}/run/tok/final\n    data: {builtin: toy/translate, max_samples: 4}\n"),
    Case("model-path-missing", 2, ("stages.bad.models.0", "'./nowhere/model' not found", "check the path"),
         append="  bad:\n    kind: eval\n    models: [./nowhere/model]\n    data: {builtin: toy/corpus, max_samples: 4}\n    metrics: [perplexity]\n"),
    Case("finetune-from-tokenizer-dir", 2, ("stages.bad.from", "cannot load a model"),
         append="  bad:\n    kind: finetune\n    task: causal_lm\n    from: {tmp}/run/tok/final\n    data: {builtin: toy/translate, max_samples: 8}\n    prompt_column: source\n    response_column: target\n"),
    Case("prompt-from-tokenizer-dir", 2, ("stages.bad.from", "cannot load a model from", "tok/final"),
         append="  bad:\n    kind: prompt\n    method: zero_shot\n    from: {tmp}/run/tok/final\n    template: '{source} ='\n"),
    # The same three naming the tokenizer *stage*: validate knows it writes no model.
    Case("predict-model-is-tokenizer-stage", 2, ("stages.bad.model", "'tok' is a tokenizer stage"),
         append="  bad:\n    kind: predict\n    model: tok\n    data: {builtin: toy/translate, max_samples: 4}\n"),
    Case("finetune-from-tokenizer-stage", 2, ("stages.bad.from", "'tok' is a tokenizer stage"),
         append="  bad:\n    kind: finetune\n    task: causal_lm\n    from: tok\n    data: {builtin: toy/translate, max_samples: 8}\n    prompt_column: source\n    response_column: target\n"),
    Case("prompt-from-tokenizer-stage", 2, ("stages.bad.from", "'tok' is a tokenizer stage"),
         append="  bad:\n    kind: prompt\n    method: zero_shot\n    from: tok\n    template: '{source} ='\n"),
    Case("template-unknown-column", 2, ("stages.bad", "nope"),
         append="  bad:\n    kind: prompt\n    method: few_shot\n    from: pre\n    data: {builtin: toy/translate, max_samples: 8}\n    template: '{nope} ='\n"),
    Case("corrupt-state-json", 2, ("state.json", "corrupt", "nothing was changed"),
         append="  bad:\n    kind: tokenizer\n    data: {builtin: toy/corpus, max_samples: 50}\n    vocab_size: 300\n"),
]  # fmt: skip


for _case in RUNTIME_CASES:
    _case.base = MINI
FAST_RUNTIME = {
    "data-not-utf8", "data-dir-not-file", "missing-column-finetune", "labels-outside-label-set",
    "reference-row-empty", "seq-len-over-model-positions", "tokenizer-model-vocab-mismatch",
    "model-path-missing", "corrupt-state-json", "predict-model-is-tokenizer-stage",
    "finetune-from-tokenizer-stage", "prompt-from-tokenizer-stage",
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=() if c.id in FAST_RUNTIME else pytest.mark.slow)
        for c in RUNTIME_CASES
    ],
)
def test_bad_input_while_running_keeps_earlier_results(
    case: Case, tmp_path: Path, mini_run: Path
) -> None:
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = _materialize(case, tmp_path)
    if case.id == "corrupt-state-json":
        (run_dir / "state.json").write_text('{"stages": {"tok": ')
    run_files = {"state.json", "metrics.json", "report.md", "env.json", "recipe.yaml"}
    before = {k: v for k, v in tree_hashes(run_dir).items() if k not in run_files}
    state0 = read_json(mini_run / "state.json")["stages"]
    metrics0 = read_json(mini_run / "metrics.json")
    everything = tree_hashes(run_dir)
    res = cli("run", recipe, "--run-dir", run_dir)
    line = assert_one_clear_line(res, case, only_line=False)
    assert res.err_lines[-1] == line, "the error must be the last thing on stderr"
    if case.id == "corrupt-state-json":
        assert tree_hashes(run_dir) == everything, (
            "the corrupt state.json must be left for the user"
        )
        return
    if res.err_lines == [line] and "bad" not in read_json(run_dir / "state.json")["stages"]:
        # Found before work (better still): nothing at all may have changed.
        assert tree_hashes(run_dir) == everything, f"{case.id}: refused, yet the run dir changed"
        return
    after = {
        k: v
        for k, v in tree_hashes(run_dir).items()
        if k not in run_files and not k.startswith(("bad/", "tok2/", ".cache/"))
    }
    before = {k: v for k, v in before.items() if not k.startswith(".cache/")}
    assert after == before, f"{case.id}: earlier results changed: {set(after) ^ set(before)}"
    state = read_json(run_dir / "state.json")["stages"]
    metrics = read_json(run_dir / "metrics.json")
    for name in state0:
        assert state[name] == state0[name], f"{case.id}: state of '{name}' changed"
        assert metrics[name] == metrics0[name], f"{case.id}: metrics of '{name}' changed"
    assert state["bad"]["status"] == "failed"
    assert state["bad"]["error"] in line
    assert "bad" not in metrics
    assert not (run_dir / "bad" / "final").exists(), "a failed stage left a final/ directory"


# ------------------------------------------------------------------ file-system faults


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A mount point for a small tmpfs (root with mount rights only; skipped elsewhere)."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_run_dir_under_a_regular_file(tmp_path: Path, pipeline_recipe: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("run", pipeline_recipe, "--run-dir", blocker / "run")
    case = Case(
        "run-dir-under-file",
        2,
        (str(blocker / "run"), "cannot write the run directory", "writable --run-dir"),
    )
    assert_one_clear_line(res, case, only_line=True)
    assert blocker.read_text() == "x"


def test_run_dir_on_read_only_mount(tmp_path: Path, pipeline_recipe: Path, tmpfs: Path) -> None:
    if not _mount("-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(tmpfs)):
        pytest.skip("cannot mount a read-only tmpfs here (needs root with CAP_SYS_ADMIN)")
    res = cli("run", pipeline_recipe, "--run-dir", tmpfs / "run")
    case = Case(
        "run-dir-read-only",
        2,
        ("cannot write the run directory", "Read-only file system", "writable --run-dir"),
    )
    assert_one_clear_line(res, case, only_line=True)


def test_run_dir_in_proc(pipeline_recipe: Path) -> None:
    res = cli("run", pipeline_recipe, "--run-dir", "/proc/mlsteps-run")
    case = Case("run-dir-proc", 2, ("cannot write the run directory", "/proc/mlsteps-run"))
    assert_one_clear_line(res, case, only_line=True)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """'Billion laughs': nested aliases must not expand into an exponential walk."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("name: bomb\nstages: {t: {kind: tokenizer, data: 'builtin:toy/corpus'}}")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    try:
        proc = subprocess.run(
            [str(PYTHON), "-m", "mlsteps", "validate", str(recipe)],
            capture_output=True, text=True, timeout=20, env=subprocess_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("mlsteps validate hangs on a YAML alias bomb (exponential alias expansion)")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_error_is_one_line_in_a_real_subprocess(tmp_path: Path) -> None:
    """The in-process corpus above is representative of the real command line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PIPELINE.replace(TOK, "    vocab_size: 010\n"))
    proc = subprocess.run(
        [str(PYTHON), "-m", "mlsteps", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "stages.tok.vocab_size" in proc.stderr
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == ["r.yaml"]


# ------------------------------------------------------------------ metrics: counts and empties

METRIC_FUNCS = ["bleu", "chrf", "ter", "rouge", "exact_match", "token_f1", "accuracy", "macro_f1"]


def _metric(name: str):  # type: ignore[no-untyped-def]
    from mlsteps.metrics import classification, text

    return getattr(text, name, None) or getattr(classification, name)


@pytest.mark.parametrize("name", METRIC_FUNCS)
@pytest.mark.parametrize(
    ("preds", "refs", "expect"),
    [
        (["a b", "c d", "e f"], ["a b", "c d"], "3 predictions but 2 references"),
        ([], [], "cannot score 0 predictions"),
    ],
    ids=["count-mismatch", "empty"],
)
def test_prediction_reference_mismatch_is_an_error_not_a_score(
    name: str, preds: list[str], refs: list[str], expect: str
) -> None:
    from mlsteps.errors import UserError, field_scope

    with pytest.raises(UserError) as info, field_scope("stages.ev.metrics"):
        _metric(name)(preds, refs)
    assert expect in str(info.value) and str(info.value).startswith("stages.ev.metrics: ")


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads chmod-000 files; covered by data-dir-not-file, /proc and read-only mounts",
)
def test_unreadable_data_file(tmp_path: Path, mini_run: Path) -> None:
    data = tmp_path / "secret.txt"
    data.write_text("some text\n")
    data.chmod(0)
    run_dir = copy_run(mini_run, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        MINI
        + f"  bad:\n    kind: eval\n    models: [pre]\n    data: {data}\n    metrics: [perplexity]\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    assert_one_clear_line(
        res, Case("unreadable", 2, ("stages.bad.data", "secret.txt")), only_line=False
    )
