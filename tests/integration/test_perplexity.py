"""Perplexity against brute-force references on tiny models built from configs (no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from mlsteps.errors import UserError
from mlsteps.metrics import perplexity as ppl

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WINDOW = 24
# Every token's NLL comes out of float32 arithmetic, and the batch a window lands in (its
# padding, its batch size, hence the BLAS kernel and its summation order) changes that float32
# rounding by a few ulps. Each term is positive, so the relative error of the float64 sum is
# bounded by the per-term one: a few float32 epsilons (6e-8), never 1e-9. Intel and AMD CPUs
# differ exactly here (1.04e-9 was seen on a Xeon).
FP32_REL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: threading overhead dominates, and the CI box has 2 shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bpe(lines: list[str], specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return tok


@pytest.fixture(scope="module")
def wiki() -> list[str]:
    lines = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()][:400]


@pytest.fixture(scope="module")
def clm(wiki):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(wiki, ["<|endoftext|>"]),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=WINDOW,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tok


@pytest.fixture(scope="module")
def mlm(wiki):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = _bpe(wiki, specials)
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=20,
        pad_token_id=tok.pad_token_id,
    )
    return BertForMaskedLM(config).eval(), tok


def _nll_next(model, context: list[int], target: int) -> float:
    """-log p(target | context) from a single unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[target])


def _docs(tok, wiki: list[str], max_tokens: int, n: int) -> list[str]:
    out = [t for t in wiki if 3 <= len(tok(t)["input_ids"]) <= max_tokens]
    return out[:n]


def test_equals_one_token_at_a_time_reference(clm, wiki):
    model, tok = clm
    docs = _docs(tok, wiki, WINDOW, 8)  # every doc fits one window (BOS + tokens <= WINDOW + 1)
    nll, count = 0.0, 0
    for doc in docs:
        seq = [tok.bos_token_id] + tok(doc)["input_ids"]
        for t in range(1, len(seq)):
            nll += _nll_next(model, seq[:t], seq[t])
            count += 1
    res = ppl.causal_lm_perplexity(model, tok, docs, batch_size=3)
    assert res.scored_tokens == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=FP32_REL)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert res.bits_per_byte == pytest.approx(nll / (math.log(2) * n_bytes), rel=FP32_REL)
    n_words = sum(len(d.split()) for d in docs)
    assert res.word_perplexity == pytest.approx(math.exp(nll / n_words), rel=FP32_REL)
    assert "window=24" in res.convention and "BOS '<|endoftext|>'" in res.convention


def test_sliding_window_equals_references(clm, wiki):
    model, tok = clm
    docs = [d for d in wiki if 2 * WINDOW < len(tok(d)["input_ids"]) < 4 * WINDOW][:2]
    assert len(docs) == 2
    seqs = [[tok.bos_token_id] + tok(d)["input_ids"] for d in docs]
    # stride 1: every token sees exactly min(t, window) previous tokens.
    full = [
        _nll_next(model, s[max(0, t - WINDOW) : t], s[t]) for s in seqs for t in range(1, len(s))
    ]
    res = ppl.causal_lm_perplexity(model, tok, docs, stride_tokens=1, batch_size=8)
    assert res.scored_tokens == len(full)
    assert res.nll_sum_nats == pytest.approx(sum(full), rel=FP32_REL)

    # stride == window: target chunks [1, W+1), [W+1, 2W+1), ...; each chunk is predicted from
    # the W tokens before its last target (so a short last chunk gets extra context).
    def context_start(t: int, n: int) -> int:
        chunk_end = min(1 + WINDOW * ((t - 1) // WINDOW + 1), n)
        return max(0, chunk_end - 1 - WINDOW)

    disjoint = [
        _nll_next(model, s[context_start(t, len(s)) : t], s[t])
        for s in seqs
        for t in range(1, len(s))
    ]
    res = ppl.causal_lm_perplexity(model, tok, docs, batch_size=8)
    assert res.nll_sum_nats == pytest.approx(sum(disjoint), rel=FP32_REL)
    assert sum(disjoint) != pytest.approx(sum(full), rel=FP32_REL)  # the stride really matters


def test_batch_size_does_not_change_the_result(clm, wiki):
    model, tok = clm
    docs = _docs(tok, wiki, 3 * WINDOW, 16)  # mixed lengths: padding in every batch
    one = ppl.causal_lm_perplexity(model, tok, docs, stride_tokens=8, batch_size=1)
    eight = ppl.causal_lm_perplexity(model, tok, docs, stride_tokens=8, batch_size=8)
    assert one.scored_tokens == eight.scored_tokens
    assert eight.perplexity == pytest.approx(one.perplexity, rel=FP32_REL)
    assert one.perplexity == pytest.approx(math.exp(one.nll_sum_nats / one.scored_tokens))


def test_stride_does_not_matter_when_documents_fit_one_window(clm, wiki):
    model, tok = clm
    docs = _docs(tok, wiki, WINDOW, 12)
    results = {
        s: ppl.causal_lm_perplexity(model, tok, docs, stride_tokens=s).nll_sum_nats
        for s in (1, 5, WINDOW)
    }
    assert results[1] == pytest.approx(results[WINDOW], rel=FP32_REL)
    assert results[5] == pytest.approx(results[WINDOW], rel=FP32_REL)


def test_stream_mode_scores_the_same_tokens_with_eos_separators_as_context(clm, wiki):
    model, tok = clm
    docs = _docs(tok, wiki, 10, 4)
    doc_mode = ppl.causal_lm_perplexity(model, tok, docs)
    stream = ppl.causal_lm_perplexity(model, tok, docs, mode="stream", stride_tokens=1)
    assert stream.scored_tokens == doc_mode.scored_tokens
    seq, scored = [tok.eos_token_id], []
    for i, doc in enumerate(docs):
        if i:
            seq.append(tok.eos_token_id)
        scored += list(range(len(seq), len(seq) + len(tok(doc)["input_ids"])))
        seq += tok(doc)["input_ids"]
    reference = sum(_nll_next(model, seq[max(0, t - WINDOW) : t], seq[t]) for t in scored)
    assert stream.nll_sum_nats == pytest.approx(reference, rel=FP32_REL)
    assert "stream" in stream.convention


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_shards_of_the_windows_add_up_to_the_whole(clm, wiki, mode):
    """What each of 3 processes scores (shard of the windows) sums to the one-process result."""
    from mlsteps.distributed import shard_indices

    model, tok = clm
    docs = _docs(tok, wiki, 3 * WINDOW, 10)
    whole = ppl.causal_lm_perplexity(model, tok, docs, mode=mode, stride_tokens=8)
    parts = [
        ppl.causal_lm_perplexity(
            model, tok, docs, mode=mode, stride_tokens=8,
            shard=lambda n, r=r: shard_indices(n, r, 3),
        )
        for r in range(3)
    ]  # fmt: skip
    assert all(p.scored_tokens > 0 for p in parts)  # every process got work
    assert sum(p.scored_tokens for p in parts) == whole.scored_tokens
    assert sum(p.nll_sum_nats for p in parts) == pytest.approx(whole.nll_sum_nats, rel=FP32_REL)
    assert all(p.utf8_bytes == whole.utf8_bytes for p in parts)


def test_chinese_words_and_bytes(clm):
    model, tok = clm
    lines = (DATA / "luxun" / "野草.txt").read_text(encoding="utf-8").splitlines()
    docs = [line.strip() for line in lines if len(line.strip()) > 5][:3]
    res = ppl.causal_lm_perplexity(model, tok, docs)
    chars = sum(len(d) for d in docs)
    assert ppl.count_words("鲁迅 写了 野草 (1927)") == 7  # 6 characters + one Latin word
    assert res.words <= chars and res.words > 0.8 * chars  # ~one word per character
    assert res.utf8_bytes == sum(len(d.encode("utf-8")) for d in docs)


def test_bad_settings_are_user_errors(clm):
    model, tok = clm
    with pytest.raises(UserError, match="stride 30 exceeds window 24"):
        ppl.causal_lm_perplexity(model, tok, ["a b c"], stride_tokens=30)
    with pytest.raises(UserError, match="exceeds the model's 24 positions"):
        ppl.causal_lm_perplexity(model, tok, ["a b c"], window_tokens=100)
    with pytest.raises(UserError, match="no tokens to score"):
        ppl.causal_lm_perplexity(model, tok, ["", "  "])


def test_pseudo_perplexity_equals_one_mask_at_a_time(mlm, wiki):
    model, tok = mlm
    docs = _docs(tok, wiki, 30, 4)  # some longer than one chunk of 18 tokens + [CLS]/[SEP]
    assert any(len(tok(d, add_special_tokens=False)["input_ids"]) > 18 for d in docs)
    nll, count = 0.0, 0
    body = 20 - 2
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunk = [tok.cls_token_id] + ids[start : start + body] + [tok.sep_token_id]
            for p in range(1, len(chunk) - 1):
                masked = list(chunk)
                masked[p] = tok.mask_token_id
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([masked])).logits[0, p].double()
                nll -= float(torch.log_softmax(logits, -1)[chunk[p]])
                count += 1
    res = ppl.pseudo_perplexity(model, tok, docs, batch_size=16)
    assert res.scored_tokens == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=FP32_REL)
    assert "pseudo-perplexity" in res.convention


def test_masked_perplexity_is_fixed_by_its_seed(mlm, wiki):
    model, tok = mlm
    docs = wiki[:10]
    a = ppl.masked_lm_perplexity(model, tok, docs, mask_seed=3, batch_size=1)
    b = ppl.masked_lm_perplexity(model, tok, docs, mask_seed=3, batch_size=8)
    c = ppl.masked_lm_perplexity(model, tok, docs, mask_seed=4, batch_size=8)
    assert a.scored_tokens == b.scored_tokens
    assert b.perplexity == pytest.approx(a.perplexity, rel=FP32_REL)  # same mask, any batching
    assert c.perplexity != pytest.approx(a.perplexity, rel=FP32_REL)  # another mask
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert 0.12 * n_tokens < a.scored_tokens < 0.2 * n_tokens
    assert "mask_seed=3" in a.convention


def test_masked_lm_needs_a_mask_token(clm):
    model, tok = clm
    with pytest.raises(UserError, match="no mask token"):
        ppl.pseudo_perplexity(model, tok, ["a b"])
