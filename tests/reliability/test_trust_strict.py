"""Nothing in a recipe is silently misread (issue 14, parts 3 and 5).

- Every value a library would refuse later (a seed numpy rejects, an infinite epoch count, an
  integer past int64) is refused by ``validate``: exit 2, one line, before any work.
- Strict means strict: booleans are never numbers (nor numbers booleans), nesting deep enough to
  crash the parser is refused, stage names are ones an override can reach, a field that does
  nothing under another field's value is refused, and an override that YAML reads as a mapping
  or list where text was meant says so and how to quote it.

Each error must be exactly one stderr line naming the place (``recipe.yaml:LINE (dotted.key)``
where it came from the file) and the fix. Everything runs in this process through
``mlsteps.cli.main`` and stops at validation: no torch import, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from relkit import cli

BASE = """\
name: strict
seed: 7
defaults:
  train: {batch_size: 4, lr: 1.0e-3}
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/corpus, max_samples: 300}
    vocab_size: 300
  pre:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 64}
    data: {builtin: toy/corpus, max_samples: 120}
    max_seq_len: 32
    train: {max_steps: 8}
  cls:
    kind: finetune
    task: classification
    from: pre
    data: {builtin: toy/sentiment, max_samples: 40}
    train: {max_steps: 2}
  sft:
    kind: finetune
    task: causal_lm
    from: pre
    data: {builtin: toy/translate, max_samples: 40}
    prompt_column: source
    response_column: target
    generation: {max_new_tokens: 4}
    train: {max_steps: 2}
  soft:
    kind: prompt
    method: prompt_tuning
    from: pre
    data: {builtin: toy/translate, max_samples: 40}
    template: "{source} ="
    num_virtual_tokens: 4
    train: {max_steps: 2}
  ev:
    kind: eval
    models: [pre, sft]
    data: {builtin: toy/translate, split: test, max_samples: 6}
    metrics: [chrf, exact_match]
    generation: {max_new_tokens: 4}
  ppl:
    kind: eval
    models: [pre]
    data: {builtin: toy/corpus, split: test, max_samples: 8}
    metrics: [perplexity]
"""


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # substrings of the one error line: place, what, fix
    replace: tuple[tuple[str, str], ...] = ()  # (old, new) edits of BASE, each must apply once
    args: tuple[str, ...] = ()  # overrides after the recipe
    recipe: str | None = None  # whole recipe text instead of BASE

    def text(self) -> str:
        text = self.recipe if self.recipe is not None else BASE
        for old, new in self.replace:
            assert text.count(old) == 1, f"{self.id}: edit target {old!r} not unique in BASE"
            text = text.replace(old, new)
        return text


def _write(case: Case, tmp: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(case.text(), encoding="utf-8")
    return path


def assert_refused(res, case: Case) -> str:  # type: ignore[no-untyped-def]
    assert res.code == 2, f"{case.id}: exit {res.code}, stderr:\n{res.err[-2000:]}"
    assert "Traceback" not in res.err, f"{case.id}: traceback:\n{res.err[-2000:]}"
    assert len(res.err_lines) == 1, f"{case.id}: not one line on stderr:\n{res.err[-2000:]}"
    line = res.err_lines[0]
    assert line.startswith("error: "), line
    for part in case.expect:
        assert part in line, f"{case.id}: {part!r} missing from: {line}"
    return line


PRE_TRAIN = "    train: {max_steps: 8}\n"
TOK_VOCAB = "    vocab_size: 300\n"
SFT_GEN = "    generation: {max_new_tokens: 4}\n    train: {max_steps: 2}\n"
EV_GEN = "    metrics: [chrf, exact_match]\n    generation: {max_new_tokens: 4}\n"

# ---------------------------------------------------------------- part 3: values libraries refuse
# One case per field class; the comment names the library that failed later (exit 1) before.
NUMERIC_CASES = [
    # seeds: numpy / transformers.set_seed take 0..2**32-1 ("Seed must be between 0 and 2**32 - 1")
    Case("seed-negative", ("recipe.yaml:2 (seed)", "greater than or equal to 0"),
         replace=(("seed: 7", "seed: -1"),)),
    Case("seed-2**32", ("recipe.yaml:2 (seed)", "less than or equal to 4294967295"),
         replace=(("seed: 7", "seed: 4294967296"),)),
    Case("generation-seed-negative", ("(stages.sft.generation.seed)", "greater than or equal to 0"),
         replace=((SFT_GEN, "    generation: {max_new_tokens: 4, do_sample: true, seed: -3}\n    train: {max_steps: 2}\n"),)),
    Case("shuffle-seed-too-big", ("(stages.cls.data.shuffle_seed)", "less than or equal to 4294967295"),
         replace=(("{builtin: toy/sentiment, max_samples: 40}", "{builtin: toy/sentiment, shuffle_seed: 99999999999}"),)),
    Case("mask-seed-negative", ("(stages.ppl.perplexity.mask_seed)", "greater than or equal to 0"),
         replace=(("    metrics: [perplexity]\n", "    metrics: [masked_perplexity]\n    perplexity: {mask_seed: -1}\n"),)),
    # inf / nan floats: the Trainer's OverflowError, NaN learning rates and temperatures
    Case("epochs-inf", ("(stages.pre.train.epochs)", "finite number"),
         replace=((PRE_TRAIN, "    train: {epochs: .inf}\n"),)),
    Case("weight-decay-inf", ("(stages.pre.train.weight_decay)", "finite number"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, weight_decay: .inf}\n"),)),
    Case("max-grad-norm-inf", ("(stages.pre.train.max_grad_norm)", "finite number"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, max_grad_norm: .inf}\n"),)),
    Case("lr-inf", ("(stages.pre.train.lr)", "finite number"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, lr: .inf}\n"),)),
    Case("temperature-inf", ("(stages.sft.generation.temperature)", "finite number"),
         replace=((SFT_GEN, "    generation: {do_sample: true, temperature: .inf}\n    train: {max_steps: 2}\n"),)),
    Case("lora-alpha-inf", ("(stages.sft.lora.alpha)", "finite number"),
         replace=((SFT_GEN, "    method: lora\n    lora: {alpha: .inf}\n" + SFT_GEN),)),
    # a value from defaults is named at its line in defaults (it was named at the stage's line)
    Case("lr-inf-in-defaults", ("recipe.yaml:4 (defaults.train.lr, merged into stages.pre)", "finite number"),
         replace=(("lr: 1.0e-3}", "lr: .inf}"),)),
    # probabilities and fractions
    Case("mlm-probability-1", ("(stages.pre.mlm_probability)", "less than 1"),
         replace=(("    max_seq_len: 32\n", "    max_seq_len: 32\n    mlm_probability: 1.0\n"),)),
    Case("dropout-1", ("(stages.pre.model.dropout)", "less than 1"),
         replace=(("max_positions: 64}", "max_positions: 64, dropout: 1.0}"),)),
    Case("top-p-zero", ("(stages.sft.generation.top_p)", "greater than 0"),
         replace=((SFT_GEN, "    generation: {do_sample: true, top_p: 0}\n    train: {max_steps: 2}\n"),)),
    Case("mask-fraction-nan", ("(stages.ppl.perplexity.mask_fraction)", "finite number"),
         replace=(("    metrics: [perplexity]\n", "    metrics: [masked_perplexity]\n    perplexity: {mask_fraction: .nan}\n"),)),
    # sizes: at least 1; integers past int64 (torch and numpy overflow)
    Case("num-beams-zero", ("(stages.ev.generation.num_beams)", "greater than 0"),
         replace=((EV_GEN, "    metrics: [chrf, exact_match]\n    generation: {num_beams: 0}\n"),)),
    Case("vocab-size-past-int64", ("(stages.tok.vocab_size)", "less than or equal to 9223372036854775807"),
         replace=((TOK_VOCAB, "    vocab_size: 18446744073709551616\n"),)),
    Case("max-steps-past-int64", ("(stages.pre.train.max_steps)", "less than or equal to 9223372036854775807"),
         replace=((PRE_TRAIN, "    train: {max_steps: 1.0e+30}\n"),)),
    Case("max-steps-fractional", ("(stages.pre.train.max_steps)", "valid integer"),
         replace=((PRE_TRAIN, "    train: {max_steps: 2.5}\n"),)),
    Case("timeout-past-timedelta", ("(distributed.timeout_s)", "less than or equal to 1000000000"),
         replace=(("seed: 7\n", "seed: 7\ndistributed: {timeout_s: 100000000000000}\n"),)),
    # below what the tokenizer trainer can build: was refused only when the stage ran
    Case("vocab-size-below-bpe-minimum", ("recipe.yaml:9 (stages.tok.vocab_size)", "too small for bpe", "at least 260"),
         replace=((TOK_VOCAB, "    vocab_size: 20\n"),)),
    # numbers given as text are not numbers
    Case("vocab-size-as-text", ("(stages.tok.vocab_size)", "valid integer"),
         replace=((TOK_VOCAB, "    vocab_size: '300'\n"),)),
]  # fmt: skip

# ---------------------------------------------------------------- part 5: strict means strict
DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_MAP = "{a: " * 3000 + "1" + "}" * 3000
# 600 anchors, each a list holding the one before: shallow as written, 600 deep when read.
DEEP_ALIASES = (
    "x:\n"
    + "\n".join(["- &a0 [x]"] + [f"- &a{i} [*a{i - 1}]" for i in range(1, 600)])
    + "\ndescription: *a599"
)
STRICT_CASES = [
    # booleans are not numbers, numbers are not booleans
    Case("vocab-size-true", ("recipe.yaml:9 (stages.tok.vocab_size)", "expected a number", "'true'", "write a number"),
         replace=((TOK_VOCAB, "    vocab_size: true\n"),)),
    Case("override-max-steps-yes", ("(stages.pre.train.max_steps)", "expected a number", "write a number"),
         args=("stages.pre.train.max_steps=yes",)),
    Case("override-lr-true", ("(stages.pre.train.lr)", "expected a number", "write a number"),
         args=("stages.pre.train.lr=true",)),
    Case("zero-stage-true", ("(distributed.deepspeed.zero_stage)", "expected a number"),
         replace=(("seed: 7\n", "seed: 7\ndistributed: {deepspeed: {zero_stage: true}}\n"),)),
    Case("bool-field-one", ("(stages.pre.train.compile)", "valid boolean"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, compile: 1}\n"),)),
    # deep nesting: RecursionError (exit 1) before
    Case("deep-list-in-recipe", ("recipe.yaml:", "nested deeper than 50 levels", "unbalanced"),
         replace=(("name: strict", f"name: strict\ndeep: {DEEP_LIST}"),)),
    Case("deep-map-in-recipe", ("recipe.yaml:", "nested deeper than 50 levels"),
         replace=(("name: strict", f"name: strict\ndeep: {DEEP_MAP}"),)),
    Case("deep-aliases", ("recipe.yaml:", "nested deeper than 50 levels through aliases", "remove the nested aliases"),
         replace=(("name: strict", "name: strict\n" + DEEP_ALIASES),), args=("seed=3",)),  # overrides deep-copy: RecursionError
    Case("deep-list-in-override", ("override", "nested deeper than 50 levels"),
         args=(f"stages.tok.data={DEEP_LIST}",)),
    # stage names an override cannot reach, or keys YAML turns into something else
    Case("null-stage-key", ("recipe.yaml:", "key 'null' is null in YAML", "quote it"),
         replace=(("  tok:\n", "  null:\n"),)),
    Case("bool-stage-key", ("recipe.yaml:", "key 'yes' is the boolean true", "quote it"),
         replace=(("  tok:\n", "  yes:\n"),)),
    Case("stage-name-with-dot", ("recipe.yaml:6 (stages.tok.v2)", "no '.'", "rename the stage"),
         replace=(("  tok:\n", "  tok.v2:\n"), ("    tokenizer: tok\n", "    tokenizer: tok.v2\n"))),
    # guards (refused before too): characters that break override keys or paths
    *[
        Case(f"stage-name-{label}", (f"(stages.{name})", "one path component", "rename the stage"),
             replace=(("  tok:\n", f"  {name}:\n"), ("    tokenizer: tok\n", f"    tokenizer: '{name}'\n")))
        for label, name in (("tilde", "~tok"), ("equals", "tok=1"), ("space", "my tok"), ("leading-dash", "-tok"))
    ],
    # fields that do nothing under another field's value
    Case("lora-block-with-method-full", ("recipe.yaml:", "(stages.sft.lora)", "'lora' does nothing", "method is full", "method: lora"),
         replace=((SFT_GEN, SFT_GEN + "    lora: {r: 4}\n"),)),
    Case("source-column-on-classification", ("(stages.cls.source_column)", "task is classification", "task seq2seq"),
         replace=(("    data: {builtin: toy/sentiment, max_samples: 40}\n", "    data: {builtin: toy/sentiment, max_samples: 40}\n    source_column: text\n"),)),
    Case("template-column-on-seq2seq", ("(stages.sft.max_seq_len)", "task is seq2seq", "classification or causal_lm"),
         replace=(("    task: causal_lm\n", "    task: seq2seq\n"), ("    prompt_column: source\n    response_column: target\n", "    max_seq_len: 64\n"))),
    Case("mlm-probability-with-clm", ("recipe.yaml:17 (stages.pre.mlm_probability)", "objective is clm", "objective: mlm"),
         replace=(("    max_seq_len: 32\n", "    max_seq_len: 32\n    mlm_probability: 0.3\n"),)),
    Case("prompt-column-with-template", ("(stages.sft.prompt_column)", "'template' builds the prompt"),
         replace=(("    prompt_column: source\n", "    prompt_column: source\n    template: 'In: {source} Out: '\n"),)),
    Case("temperature-without-sampling", ("(stages.sft.generation.temperature)", "do_sample is false", "do_sample: true"),
         replace=((SFT_GEN, "    generation: {max_new_tokens: 4, temperature: 0.7}\n    train: {max_steps: 2}\n"),)),
    Case("epochs-with-max-steps", ("(stages.pre.train.epochs)", "max_steps is set", "remove one"),
         replace=((PRE_TRAIN, "    train: {max_steps: 8, epochs: 3}\n"),)),
    Case("validation-fraction-with-validation", ("(stages.pre.validation_fraction)", "'validation' is given"),
         replace=(("    max_seq_len: 32\n", "    max_seq_len: 32\n    validation: {builtin: toy/corpus, split: validation}\n    validation_fraction: 0.2\n"),)),
    Case("eval-every-without-validation", ("(stages.pre.train.eval_every_steps)", "no validation rows"),
         replace=(("    max_seq_len: 32\n", "    max_seq_len: 32\n    validation_fraction: 0\n"), (PRE_TRAIN, "    train: {max_steps: 8, eval_every_steps: 2}\n"))),
    Case("sft-generation-without-validation", ("(stages.sft.generation)", "no validation rows"),
         replace=(("    prompt_column: source\n", "    prompt_column: source\n    validation_fraction: 0\n"),)),
    Case("find-unused-parameters-with-fsdp", ("(distributed.find_unused_parameters)", "DDP setting and fsdp"),
         replace=(("seed: 7\n", "seed: 7\ndistributed: {find_unused_parameters: true, fsdp: {}}\n"),)),
    Case("split-of-local-files", ("(stages.tok.data.split)", "local files are read whole", "'rows'"),
         replace=(("{builtin: toy/corpus, max_samples: 300}", "{files: [recipe.yaml], split: test}"),)),
    Case("columns-of-jsonl", ("(stages.tok.data.columns)", "the files are jsonl"),
         replace=(("{builtin: toy/corpus, max_samples: 300}", "{files: [x.jsonl], columns: [a, b]}"),)),
    Case("hub-config-of-builtin", ("(stages.tok.data.hub_config)", "not from the hub"),
         replace=(("{builtin: toy/corpus, max_samples: 300}", "{builtin: toy/corpus, hub_config: wikitext-2}"),)),
    Case("tokenizer-from-with-vocab-size", ("(stages.tok.vocab_size)", "wraps an existing tokenizer"),
         replace=(("    data: {builtin: toy/corpus, max_samples: 300}\n", "    from: gpt2\n"),)),
    Case("few-shot-with-virtual-tokens", ("(stages.soft.num_virtual_tokens)", "method few_shot trains nothing"),
         replace=(("    method: prompt_tuning\n", "    method: few_shot\n"), ("    train: {max_steps: 2}\n  ev:", "  ev:"))),
    Case("soft-prompt-with-shots", ("(stages.soft.shots)", "shows no demonstrations"),
         replace=(("    num_virtual_tokens: 4\n", "    num_virtual_tokens: 4\n    shots: 2\n"),)),
    Case("eval-text-column-without-perplexity", ("(stages.ev.text_column)", "no text perplexity metric"),
         replace=((EV_GEN, EV_GEN + "    text_column: source\n"),)),
    Case("eval-target-lang-with-chrf-only", ("(stages.ev.target_lang)", "bleu, ter, rouge"),
         replace=((EV_GEN, EV_GEN + "    target_lang: de\n"),)),
    Case("eval-generation-with-perplexity-only", ("(stages.ppl.generation)", "no generation, label or preference metric"),
         replace=(("    metrics: [perplexity]\n", "    metrics: [perplexity]\n    generation: {num_beams: 2}\n"),)),
    Case("eval-stride-with-masked-only", ("(stages.ppl.perplexity.stride)", "only perplexity and response_perplexity"),
         replace=(("    metrics: [perplexity]\n", "    metrics: [pseudo_perplexity]\n    perplexity: {stride: 8}\n"),)),
    Case("fsdp-min-params-without-size-wrap", ("(distributed.fsdp.min_params)", "auto_wrap is transformer_layer"),
         replace=(("seed: 7\n", "seed: 7\ndistributed: {fsdp: {min_params: 5000}}\n"),)),
    # an override can make a field of the file do nothing: the fix names the ~KEY that removes it
    Case("override-max-steps-over-epochs", ("(stages.pre.train.epochs)", "max_steps is set", "on the command line: ~stages.pre.train.epochs"),
         replace=((PRE_TRAIN, "    train: {epochs: 3}\n"),), args=("stages.pre.train.max_steps=5",)),
    # override values YAML reads as a mapping or list where text was meant
    Case("override-rows-mapping", ("(stages.tok.data.rows)", "read as a YAML mapping", "quote the value", "\"stages.tok.data.rows='90%:'\""),
         args=("stages.tok.data.rows=90%:",)),
    Case("override-template-mapping", ("(stages.soft.template)", "read as a YAML mapping", "stages.soft.template='In: {source}'"),
         args=("stages.soft.template=In: {source}",)),
    Case("override-union-field-mapping", ("(stages.pre.text_column)", "read as a YAML mapping", "stages.pre.text_column='a: b'"),
         args=("stages.pre.text_column=a: b",)),
    Case("override-number-list", ("(stages.pre.train.max_steps)", "read as a YAML list", "give a single value"),
         args=("stages.pre.train.max_steps=[5]",)),
    Case("override-name-list", ("(name)", "read as a YAML list", "name='[a]'"),
         args=("name=[a]",)),
]  # fmt: skip


def test_the_base_recipe_is_valid(tmp_path: Path) -> None:
    res = cli("validate", _write(Case("base", ()), tmp_path))
    assert res.code == 0, res.err


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=lambda c: c.id)
def test_values_a_library_would_refuse_are_refused_by_validate(case: Case, tmp_path: Path) -> None:
    assert_refused(cli("validate", _write(case, tmp_path), *case.args), case)


@pytest.mark.parametrize("case", STRICT_CASES, ids=lambda c: c.id)
def test_strict_means_strict(case: Case, tmp_path: Path) -> None:
    assert_refused(cli("validate", _write(case, tmp_path), *case.args), case)


def test_run_refuses_a_bad_seed_before_any_work(tmp_path: Path) -> None:
    """Before: validate passed and run failed with exit 1 inside numpy."""
    case = Case("run-seed-negative", ("(seed)", "greater than or equal to 0"),
                replace=(("seed: 7", "seed: -1"),))  # fmt: skip
    res = cli("run", _write(case, tmp_path), "--run-dir", tmp_path / "run")
    assert_refused(res, case)
    assert not (tmp_path / "run").exists()


def test_deep_nesting_in_a_stage_config_file(tmp_path: Path) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text(f"data: builtin:toy/corpus\nvocab_size: {DEEP_LIST}\n")
    res = cli("tokenizer", "--config", config, "--run-dir", tmp_path / "run")
    assert_refused(res, Case("config-deep", ("deep.yaml:2", "nested deeper than 50 levels")))
    assert not (tmp_path / "run").exists()


def test_stage_config_file_errors_name_its_line(tmp_path: Path) -> None:
    config = tmp_path / "tok.yaml"
    config.write_text("data: builtin:toy/corpus\nvocab_size: on\n")
    res = cli("tokenizer", "--config", config, "--run-dir", tmp_path / "run")
    case = Case("config-bool", ("tok.yaml:2 (stages.tokenizer.vocab_size)", "expected a number"))
    assert_refused(res, case)


def test_stage_command_names_the_override_that_removes_a_do_nothing_field(tmp_path: Path) -> None:
    config = tmp_path / "tok.yaml"
    config.write_text("from: gpt2\n")
    res = cli("tokenizer", "--config", config, "vocab_size=100", "--run-dir", tmp_path / "run")
    case = Case("config-ignored", ("(stages.tokenizer.vocab_size)", "'from' wraps", "~vocab_size"))
    line = assert_refused(res, case)
    assert "~stages.tokenizer" not in line  # the stage command's keys have no stages.NAME part
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- what must keep working
VALID = [
    # exponent floats stay floats, ints count as floats, whole floats as ints
    ("lr-exponent-and-int-for-float", (), ("stages.pre.train.lr=1e-4", "~stages.pre.train.max_steps", "stages.pre.train.epochs=2")),
    ("max-steps-1e3", (), ("stages.pre.train.max_steps=1e3",)),
    ("max-steps-replacing-epochs", ((PRE_TRAIN, "    train: {epochs: 3}\n"),), ("stages.pre.train.max_steps=5", "~stages.pre.train.epochs")),
    ("seed-bounds", (("seed: 7", "seed: 4294967295"),), ("stages.sft.generation.do_sample=true", "stages.sft.generation.seed=0")),
    # a field that does nothing is fine when only defaults put it there
    ("defaults-generation-sampling", (("defaults:\n", "defaults:\n  generation: {temperature: 0.7, top_p: 0.9}\n  mlm_probability: 0.3\n"),), ()),
    # ... or when it holds its default value (a resolved recipe writes every field out)
    ("default-valued-fields", (("    prompt_column: source\n", "    prompt_column: source\n    source_column: source\n    method: full\n    lora: {r: 8}\n"),), ()),
    # quoted text keys and quoted override values are what they say
    ("quoted-override-rows", (), ("stages.tok.data.rows=':90%'", "stages.soft.template='In: {source} ='")),
    ("quoted-yes-key", (("  tok:\n", "  'yes':\n"), ("    tokenizer: tok\n", "    tokenizer: 'yes'\n")), ()),
]  # fmt: skip


@pytest.mark.parametrize(("edits", "overrides"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_what_must_keep_validating(edits: tuple, overrides: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    res = cli("validate", _write(Case("ok", (), replace=edits), tmp_path), *overrides)
    assert res.code == 0, res.err
