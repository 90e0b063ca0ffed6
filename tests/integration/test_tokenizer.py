"""The tokenizer stage: BPE / WordPiece / Unigram, special tokens per target, Chinese, wrapping an
existing tokenizer, and the errors for unusable settings."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mlsteps.context import StageContext
from mlsteps.errors import UserError
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
WIKI = SHARED / "wikitext-2" / "valid.txt"
LUXUN = SHARED / "luxun" / "呐喊.txt"
FINAL_FILES = {"tokenizer.json", "tokenizer_config.json"}


def run(
    tmp_path: Path, data: Path | None = WIKI, rows: int = 300, **fields: Any
) -> tuple[dict, Any]:
    sources = fields.pop("sources", None)
    spec: dict[str, Any] = {"kind": "tokenizer", "vocab_size": 400, **fields}
    if sources is not None:
        spec["data"] = sources
    elif data is not None:
        spec["data"] = {"files": [str(data)], "max_samples": rows}
    ctx = StageContext(run_dir=tmp_path, stage="tok", kind="tokenizer", seed=0, quiet=True)
    result = tokenizer.run(TokenizerSpec.model_validate(spec), ctx)
    # The stage leaves exactly a loadable tokenizer in final/ (no temp dirs, no other files).
    assert {p.name for p in ctx.stage_dir.iterdir()} == {"final"}
    assert {p.name for p in ctx.final_dir.iterdir()} == FINAL_FILES
    return result.metrics, AutoTokenizer.from_pretrained(ctx.final_dir)


def test_bpe_clm(tmp_path: Path) -> None:
    metrics, tok = run(tmp_path)
    assert metrics["vocab_size"] == len(tok) == 400
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
    ]
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    text = "The game 's release was delayed until 2011 ."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless, no special tokens added for clm
    # WikiText writes rare words as the literal "<unk>", which is the unk token: the only unks.
    wiki_unks = sum(line.count("<unk>") for line in _lines(WIKI, 300))
    assert metrics["unk_rate"] > 0 and wiki_unks > 0
    assert metrics["chars_per_token"] > 1.5
    # More merges -> fewer tokens per character on the same text.
    bigger, _ = run(tmp_path / "big", vocab_size=800)
    assert bigger["chars_per_token"] > metrics["chars_per_token"]


def test_wordpiece_mlm_post_processor(tmp_path: Path) -> None:
    metrics, tok = run(tmp_path, algorithm="wordpiece", target="mlm", lowercase=True)
    assert [tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token] == [
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[PAD]",
    ]
    single = tok("The Film")["input_ids"]
    assert single[0] == tok.cls_token_id and single[-1] == tok.sep_token_id
    assert tok("the film")["input_ids"] == single  # lowercase normalisation
    pair = tok("a film", "a game")
    assert pair["input_ids"].count(tok.sep_token_id) == 2 and set(pair["token_type_ids"]) == {0, 1}
    assert metrics["unk_rate"] < 0.05


def test_bpe_mlm_is_roberta_style(tmp_path: Path) -> None:
    _, tok = run(tmp_path, target="mlm")
    assert [tok.cls_token, tok.sep_token, tok.mask_token] == ["<s>", "</s>", "<mask>"]
    pair = tok("a", "b")["input_ids"]
    assert pair.count(tok.sep_token_id) == 3  # <s> a </s></s> b </s>


def test_unigram_seq2seq(tmp_path: Path) -> None:
    metrics, tok = run(tmp_path, algorithm="unigram", target="seq2seq", rows=150)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1  # T5 convention
    ids = tok("The game was good")["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "The game was good"
    assert metrics["algorithm"] == "unigram"


@pytest.mark.parametrize("algorithm", ["bpe", "wordpiece"])
def test_chinese(tmp_path: Path, algorithm: str) -> None:
    metrics, tok = run(
        tmp_path, data=LUXUN, algorithm=algorithm, vocab_size=1500, normalization="nfc"
    )
    text = max(_lines(LUXUN, 300), key=len)  # a line of the training text
    assert "，" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    decoded = tok.decode(ids)
    assert decoded.replace(" ", "") == text  # WordPiece decodes CJK with spaces between characters
    if algorithm == "bpe":
        assert decoded == text and metrics["chars_per_token"] > 1.0  # merges across characters
    assert metrics["unk_rate"] == 0


def test_default_keeps_full_width_punctuation_and_nfkc_folds_it(tmp_path: Path) -> None:
    text = "墙外，有两株树。"
    _, tok = run(tmp_path / "a", data=LUXUN, rows=100, vocab_size=600)
    assert tok.decode(tok(text)["input_ids"]) == text  # nfc default: Chinese output unchanged
    _, tok = run(tmp_path / "b", data=LUXUN, rows=100, vocab_size=600, normalization="nfkc")
    assert tok.decode(tok(text)["input_ids"]) == unicodedata.normalize("NFKC", text) != text


def test_wrap_existing_tokenizer(tmp_path: Path) -> None:
    _, trained = run(tmp_path / "a", algorithm="wordpiece", target="mlm")
    source = tmp_path / "a" / "tok" / "final"
    metrics, wrapped = run(tmp_path / "b", data=None, **{"from": str(source)})
    assert metrics["vocab_size"] == len(trained) == len(wrapped)
    assert wrapped("a film")["input_ids"] == trained("a film")["input_ids"]
    # With data, the wrapped tokenizer is measured on it.
    measured, _ = run(tmp_path / "c", **{"from": str(source)})
    assert measured["chars_per_token"] > 1


def test_unusable_settings(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^stages\.tok\.vocab_size: .*too small.*at least 260"):
        run(tmp_path / "a", vocab_size=100)
    with pytest.raises(UserError, match=r"^stages\.tok\.vocab_size: .*distinct characters"):
        run(tmp_path / "b", data=LUXUN, algorithm="unigram", vocab_size=300, rows=200)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"sentence": "a b c"}\n')
    with pytest.raises(UserError, match="column 'text' not found.*sentence"):
        run(tmp_path / "c", data=jsonl)
    with pytest.raises(UserError, match=r"^stages\.tok\.from: cannot load a tokenizer"):
        run(tmp_path / "d", data=None, **{"from": str(tmp_path / "nowhere")})


def _lines(path: Path, n: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:n]


def test_several_sources_and_columns(tmp_path: Path) -> None:
    sources = ["builtin:toy/corpus", {"builtin": "toy/translate", "max_samples": 500}]
    columns = ["text", "source", "target"]
    metrics, both = run(tmp_path / "a", None, sources=sources, text_column=columns)
    # corpus rows (text) + translate rows (source and target columns)
    assert metrics["training_rows"] == 4000 + 2 * 500
    _, corpus_only = run(tmp_path / "b", None, sources="builtin:toy/corpus")
    target = "Na benon ro vuka naku kigom."  # a toy/translate target sentence
    assert len(both(target)["input_ids"]) < len(corpus_only(target)["input_ids"])
