"""BLEU/chrF/TER against the sacrebleu command-line tool, ROUGE against rouge-score's scorer.

Real data: multi30k (en->de, val), tatoeba (zh), scitldr (multi-reference summaries).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from mlsteps.errors import UserError
from mlsteps.metrics import text

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SACREBLEU = Path(sys.executable).with_name("sacrebleu")
N_ROWS = 200


def _perturb(lines: list[str], salt: int) -> list[str]:
    """Deterministic system-like outputs: drop / swap / keep words depending on the row."""
    out = []
    for i, line in enumerate(lines):
        words = line.split()
        case = (i + salt) % 4
        if case == 0 and len(words) > 2:
            words = words[:-2]
        elif case == 1 and len(words) > 1:
            words[0], words[1] = words[1], words[0]
        elif case == 2:
            words = [w.lower() for w in words][::-1] if i % 7 == 0 else words + ["und"]
        out.append(" ".join(words))
    return out


def _perturb_chars(lines: list[str], salt: int) -> list[str]:
    out = []
    for i, line in enumerate(lines):
        case = (i + salt) % 3
        out.append(line[:-2] if case == 0 else line[1:] + line[0] if case == 1 else line)
    return out


def _cli(tmp_path: Path, hyps: list[str], refs: list[list[str]], *args: str) -> dict[str, dict]:
    hyp_file = tmp_path / "hyp.txt"
    hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref_files = []
    for k, stream in enumerate(refs):
        path = tmp_path / f"ref{k}.txt"
        path.write_text("\n".join(stream) + "\n", encoding="utf-8")
        ref_files.append(str(path))
    result = subprocess.run(
        [str(SACREBLEU), *ref_files, "-i", str(hyp_file), "-f", "json", "-w", "8", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return {entry["name"][:4]: entry for entry in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def multi30k() -> tuple[list[str], list[str]]:
    with gzip.open(DATA / "multi30k" / "val.de.gz", "rt", encoding="utf-8") as f:
        refs = [line.rstrip("\n") for _, line in zip(range(N_ROWS), f, strict=False)]
    return _perturb(refs, 0), refs


def test_german_scores_equal_sacrebleu_cli(tmp_path, multi30k):
    hyps, refs = multi30k
    cli = _cli(tmp_path, hyps, [refs], "-m", "bleu", "chrf", "ter")
    ours = {
        **text.bleu(hyps, refs, target_lang="de"),
        **text.chrf(hyps, refs),
        **text.ter(hyps, refs, target_lang="de"),
    }
    assert 20 < ours["bleu"] < 95  # a real, non-degenerate score
    for name, key in (("bleu", "BLEU"), ("chrf", "chrF"), ("ter", "TER")):
        assert ours[name] == pytest.approx(cli[key]["score"], abs=1e-5), name
        assert ours[f"{name}_signature"] == cli[key]["signature"], name


def test_multi_reference_equals_sacrebleu_cli(tmp_path, multi30k):
    hyps, refs = multi30k
    second = _perturb(refs, 2)
    cli = _cli(tmp_path, hyps, [refs, second], "-m", "bleu", "chrf", "ter")
    pairs = [[a, b] for a, b in zip(refs, second, strict=True)]
    assert text.bleu(hyps, pairs)["bleu"] == pytest.approx(cli["BLEU"]["score"], abs=1e-5)
    assert text.bleu(hyps, pairs)["bleu_signature"].startswith("nrefs:2|")
    assert text.chrf(hyps, pairs)["chrf"] == pytest.approx(cli["chrF"]["score"], abs=1e-5)
    assert text.ter(hyps, pairs)["ter"] == pytest.approx(cli["TER"]["score"], abs=1e-5)
    # More references can only help BLEU.
    assert text.bleu(hyps, pairs)["bleu"] >= text.bleu(hyps, refs)["bleu"]


def test_variable_reference_counts_are_supported(multi30k):
    hyps, refs = multi30k
    mixed = [[r, r.lower()] if i % 2 else r for i, r in enumerate(refs)]
    out = text.bleu(hyps, mixed)
    assert out["bleu_signature"].startswith("nrefs:var|")
    assert out["bleu"] >= text.bleu(hyps, refs)["bleu"]


@pytest.fixture(scope="module")
def chinese() -> tuple[list[str], list[str]]:
    lines = (DATA / "tatoeba_cmn_eng" / "cmn.txt").read_text(encoding="utf-8-sig").splitlines()
    refs = [line.split("\t")[1] for line in lines[5000 : 5000 + N_ROWS]]
    return _perturb_chars(refs, 0), refs


def test_chinese_scores_equal_sacrebleu_cli_with_zh_tokenizer(tmp_path, chinese):
    hyps, refs = chinese
    cli = _cli(
        tmp_path, hyps, [refs], "-m", "bleu", "chrf", "ter", "-tok", "zh",
        "--ter-asian-support", "--ter-normalized",
    )  # fmt: skip
    for lang in ("zh", "zh-CN", None):  # given, regional, or guessed from the script
        ours = {**text.bleu(hyps, refs, target_lang=lang), **text.ter(hyps, refs, target_lang=lang)}
        assert "tok:zh" in ours["bleu_signature"]
        assert ours["bleu"] == pytest.approx(cli["BLEU"]["score"], abs=1e-5)
        assert ours["bleu_signature"] == cli["BLEU"]["signature"]
        assert ours["ter"] == pytest.approx(cli["TER"]["score"], abs=1e-5)
        assert ours["ter_signature"] == cli["TER"]["signature"]
    assert text.chrf(hyps, refs)["chrf"] == pytest.approx(cli["chrF"]["score"], abs=1e-5)


def test_identical_chinese_strings_score_perfectly(chinese):
    _, refs = chinese
    assert text.bleu(refs, refs, target_lang="zh")["bleu"] == pytest.approx(100.0)
    assert text.ter(refs, refs, target_lang="zh")["ter"] == pytest.approx(0.0)
    scores = text.rouge(refs, refs, target_lang="zh")
    for key in text.ROUGE_TYPES:
        assert scores[key] == pytest.approx(1.0), key
    # Without a language the script is recognised as well.
    assert text.rouge(refs, refs)["rouge1"] == pytest.approx(1.0)
    # The bug being avoided: rouge-score's default tokenizer drops all Chinese characters.
    plain = rouge_scorer.RougeScorer(["rouge1"]).score(refs[0], refs[0])["rouge1"].fmeasure
    assert plain == 0.0


def test_chinese_rouge_is_character_based():
    scores = text.rouge(["我爱北京"], ["我爱上海"], target_lang="zh")
    assert scores["rouge1"] == pytest.approx(0.5)  # 2 of 4 characters
    assert scores["rouge2"] == pytest.approx(1 / 3)  # 1 of 3 character bigrams


def test_japanese_and_thai_fall_back_to_char_without_mecab():
    assert text.bleu_tokenizer("th") == "char"
    assert text.bleu_tokenizer("ja") in ("ja-mecab", "char")
    assert text.bleu_tokenizer("ko") in ("ko-mecab", "char")
    assert text.bleu_tokenizer("de") == "13a"


@pytest.fixture(scope="module")
def scitldr() -> list[dict]:
    lines = (DATA / "scitldr" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_english_rouge_equals_rouge_score(scitldr):
    rows = scitldr[:50]
    hyps = [" ".join(r["source"][:2]) for r in rows]  # lead-2 baseline
    refs = [r["target"] for r in rows]
    assert any(len(r) > 1 for r in refs)  # multi-reference data
    ours = text.rouge(hyps, refs, target_lang="en")
    scorer = rouge_scorer.RougeScorer(list(text.ROUGE_TYPES), use_stemmer=True)
    expected = dict.fromkeys(text.ROUGE_TYPES, 0.0)
    for hyp, ref_list in zip(hyps, refs, strict=True):
        ref_lines = ["\n".join(text.split_sentences(r)) for r in ref_list]
        best = scorer.score_multi(ref_lines, "\n".join(text.split_sentences(hyp)))
        for key in text.ROUGE_TYPES:
            expected[key] += best[key].fmeasure / len(hyps)
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):  # newlines change nothing for these
        raw = sum(plain.score_multi(r, h)[key].fmeasure for h, r in zip(hyps, refs, strict=True))
        assert ours[key] == pytest.approx(raw / len(hyps), rel=1e-12), key
    for key in text.ROUGE_TYPES:
        assert ours[key] == pytest.approx(expected[key], rel=1e-12), key
    assert 0.1 < ours["rouge1"] < 0.6
    assert ours["rougeLsum"] != ours["rougeL"]  # Lsum really sees the sentences
    assert "stemmer" in ours["rouge_convention"]


def test_sentence_splitter_agrees_with_scitldr_boundaries(scitldr):
    """Abstract sentences in the data ending in . ! ? are re-found from the joined text."""
    agree = total = 0
    for row in scitldr:
        sents = [" ".join(s.split()) for s in row["source"][:3]]
        if all(s and s[-1] in ".!?" for s in sents):
            total += 1
            agree += text.split_sentences(" ".join(sents)) == sents
    assert total > 500
    assert agree / total > 0.98


def test_split_sentences():
    assert text.split_sentences("It rains. We stay! Why? Because.") == [
        "It rains.", "We stay!", "Why?", "Because.",
    ]  # fmt: skip
    assert text.split_sentences("他来了。我走了！好吗？") == ["他来了。", "我走了！", "好吗？"]
    assert text.split_sentences("他说：“好。”然后走了") == ["他说：“好。”", "然后走了"]
    # Not sentence ends: decimals, abbreviations followed by lower case, citations.
    assert text.split_sentences("Pi is 3.14 e.g. in math. Smith et al. (2019) agree.") == [
        "Pi is 3.14 e.g. in math.", "Smith et al. (2019) agree.",
    ]  # fmt: skip
    assert text.split_sentences("one\ntwo") == ["one", "two"]


def test_german_rouge_keeps_umlauts():
    # rouge-score's default tokenizer turns "Mädchen" into "m" + "dchen".
    scores = text.rouge(["Ein Mädchen läuft"], ["Ein Mädchen geht"], target_lang="de")
    assert scores["rouge1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter", "rouge"])
def test_bad_inputs_are_user_errors(metric):
    fn = getattr(text, metric)
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        fn(["a b", "c d"], ["a b"])
    with pytest.raises(UserError, match="cannot score 0 predictions"):
        fn([], [])
    with pytest.raises(UserError, match="cannot score 1 predictions against 0"):
        fn(["a"], [])
    with pytest.raises(UserError, match="row 0 is empty"):
        fn(["a"], [""])
    with pytest.raises(UserError, match="expected a string or a list of strings"):
        fn(["a"], [[["nested"]]])
    with pytest.raises(UserError, match="expected a string or a list of strings"):
        fn(["a"], [3])
    with pytest.raises(UserError, match="prediction 0 is list"):
        fn([["a"]], ["a"])
