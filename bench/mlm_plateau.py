"""Why the MLM start lost in the low-label ladder: the diagnosis runs of docs/quickstart.md.

A plain PyTorch loop (not the mlsteps pipeline: the point is to vary one thing at a time fast)
pretrains a tiny masked LM on a shared data set's training text, prints its validation MLM loss
next to the unigram cross-entropy of the same text (the "plateau": a model that predicts token
frequencies whatever the input), then fine-tunes it for sentiment on N = 300 labelled rows,
5 seeds (`--seeds`), against the same architecture from scratch, on the whole test split
(`--test-rows` to cut it), with the standard error of the gain.

    .venv/bin/python bench/mlm_plateau.py --lang zh_reviews --family modernbert --steps 1600
    .venv/bin/python bench/mlm_plateau.py --lang zh_reviews --family bert --lr 5e-3 --steps 400

``--family bert`` is BertForMaskedLM (post-norm, learned absolute positions, MLM head on every
position); ``modernbert`` is ModernBertForMaskedLM (pre-norm, rotary positions, head only at
the masked positions: ``sparse_prediction``). Both: dropout 0 as mlsteps builds them, mean
pooling for modernbert's classifier, [CLS] pooler for bert's.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEQ = 64
VOCAB = 4000
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _rows(lang: str, split: str) -> list[tuple[str, int]]:
    return common.labelled_rows(lang, split, "sentence" if lang == "sst2" else "text")


def _tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=SPECIALS)
    )
    named = dict(
        zip(
            ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
            SPECIALS,
            strict=True,
        )
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, **named)


def _config(args: Any, tok: Any, **extra: Any) -> Any:
    from transformers import BertConfig, ModernBertConfig

    shape = dict(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                 max_position_embeddings=256, pad_token_id=tok.pad_token_id)  # fmt: skip
    if args.family == "bert":
        return BertConfig(
            **shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra
        )
    return ModernBertConfig(**shape, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                            classifier_pooling="mean", sparse_prediction=True, **extra)  # fmt: skip


def _classes(family: str) -> tuple[Any, Any, str]:
    import transformers as tf

    if family == "bert":
        return tf.BertForMaskedLM, tf.BertForSequenceClassification, "bert"
    return tf.ModernBertForMaskedLM, tf.ModernBertForSequenceClassification, "model"


def _masker(tok: Any, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def mask(block: np.ndarray) -> tuple[Any, Any]:
        x = torch.tensor(block)
        y = x.clone()
        chosen = torch.rand(x.shape, generator=gen) < 0.15
        chosen[:, 0] = False
        y[~chosen] = -100
        r = torch.rand(x.shape, generator=gen)
        x[chosen & (r < 0.8)] = tok.mask_token_id
        rand = chosen & (r >= 0.8) & (r < 0.9)
        x[rand] = torch.randint(len(SPECIALS), len(tok), (int(rand.sum()),), generator=gen)
        return x, y

    return mask


def pretrain(args: Any, tok: Any, texts: list[str]) -> tuple[Any, dict[str, Any]]:
    import torch

    ids = tok(texts, add_special_tokens=False)["input_ids"]
    flat = np.concatenate([np.array([*x, tok.sep_token_id], dtype=np.int64) for x in ids])
    n = len(flat) // (SEQ - 1)
    blocks = flat[: n * (SEQ - 1)].reshape(n, SEQ - 1)
    blocks = np.concatenate([np.full((n, 1), tok.cls_token_id), blocks], 1)
    order = np.random.default_rng(0).permutation(n)
    val, train = blocks[order[:200]], blocks[order[200:]]
    counts = np.bincount(train.ravel(), minlength=len(tok)).astype(np.float64) + 1
    unigram_ce = float(-np.log((counts / counts.sum())[val[:, 1:].ravel()]).mean())
    torch.manual_seed(0)
    mlm_cls, _, _ = _classes(args.family)
    model = mlm_cls(_config(args, tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps, warm = args.steps, 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    val_mask = _masker(tok, 7)
    val_batches = [val_mask(val[i : i + 50]) for i in range(0, 200, 50)]
    train_mask = _masker(tok, 1)

    def val_loss() -> float:
        model.eval()
        nll, scored = 0.0, 0
        with torch.no_grad():
            for x, y in val_batches:
                logits = model(input_ids=x).logits.float()  # no labels: full logits
                nll += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))  # fmt: skip
                scored += int((y != -100).sum())
        model.train()
        return nll / scored

    curve = []
    started = time.process_time()
    for step in range(steps):
        rows = np.random.default_rng(step).integers(0, len(train), 32)
        x, y = train_mask(train[rows])
        model(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % max(steps // 8, 1) == 0:
            curve.append((step + 1, round(val_loss(), 3)))
            common.log(f"step {step + 1}: val MLM loss {curve[-1][1]} (unigram {unigram_ce:.3f})")
    cpu = time.process_time() - started
    return model, {
        "unigram_ce": round(unigram_ce, 3),
        "val_loss": curve,
        "pretrain_cpu_s": round(cpu),
    }


def finetune(
    args: Any, tok: Any, init: Any, seed: int, train: list, test: list, lr: float
) -> float:
    import torch

    torch.manual_seed(seed)
    _, cls_cls, backbone = _classes(args.family)
    model = cls_cls(_config(args, tok, num_labels=2))
    if init is not None:
        getattr(model, backbone).load_state_dict(getattr(init, backbone).state_dict())
    subset = random.Random(seed).sample(train, 300)

    def encode(rows: list) -> Any:
        enc = tok([t for t, _ in rows], truncation=True, max_length=SEQ, padding=True,
                  return_tensors="pt")  # fmt: skip
        enc.pop("token_type_ids", None)
        return enc

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = 150
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / 10) * max(0.0, 1 - s / steps)
    )
    for step in range(steps):
        batch = [subset[(step * 16 + j) % 300] for j in range(16)]
        out = model(**encode(batch), labels=torch.tensor([label for _, label in batch]))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        predicted = model(**encode(test)).logits.argmax(-1)
    return float((predicted == torch.tensor([label for _, label in test])).float().mean())


def _gain(pretrained: list[float], scratch: list[float]) -> tuple[float, float]:
    """Mean accuracy difference in points, and its standard error: the seed-to-seed spread of
    each mean added in quadrature (the test set is the same for both starts)."""
    gain = 100 * (float(np.mean(pretrained)) - float(np.mean(scratch)))
    stderr = 100 * math.sqrt(sum(float(np.var(x, ddof=1)) / len(x) for x in (pretrained, scratch)))
    return gain, stderr


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lang", default="zh_reviews", choices=["sst2", "zh_reviews"])
    p.add_argument("--family", default="modernbert", choices=["bert", "modernbert"])
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument(
        "--ft-lr", type=float, default=1e-3, help="fine-tuning rate of the pretrained start"
    )
    p.add_argument("--ft-lr-scratch", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per start")
    p.add_argument(
        "--test-rows", type=int, default=0, help="score on the first N test rows (0: all)"
    )
    p.add_argument(
        "--ft-lr-also",
        type=float,
        nargs="*",
        default=[],
        help="further fine-tuning rates of the pretrained start, scored against the same scratch "
        "runs (one MLM, several rates: a rate check costs only the fine-tunes)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="suffix of the results file name, so that points of a curve do not overwrite each "
        "other (default: none, the file name of earlier runs)",
    )
    args = p.parse_args()
    common.setup_threads(args.threads or 1)
    if args.quick:
        args.steps = 40
    train, test = _rows(args.lang, "train"), _rows(args.lang, "test")
    test = test[: args.test_rows] if args.test_rows else test
    seeds = range(1, args.seeds + 1)
    tok = _tokenizer([t for t, _ in train])
    model, result = pretrain(args, tok, [t for t, _ in train])
    started = time.process_time()
    result["pretrained"] = [finetune(args, tok, model, s, train, test, args.ft_lr) for s in seeds]
    result["scratch"] = [
        finetune(args, tok, None, s, train, test, args.ft_lr_scratch) for s in seeds
    ]
    gain, stderr = _gain(result["pretrained"], result["scratch"])
    also = {}
    for lr in args.ft_lr_also:
        accs = [finetune(args, tok, model, s, train, test, lr) for s in seeds]
        g, se = _gain(accs, result["scratch"])
        also[str(lr)] = {"pretrained": accs, "gain_points": round(g, 1),
                         "gain_stderr_points": round(se, 1)}  # fmt: skip
        common.log(f"pretrained start at fine-tuning rate {lr}: gain {g:+.1f} ± {se:.1f}")
    if also:
        result["pretrained_at_ft_lr"] = also
    result["finetune_cpu_s"] = round(time.process_time() - started)
    result.update(settings={k: v for k, v in vars(args).items() if k not in ("quick", "no_write")},
                  gain_points=round(gain, 1), gain_stderr_points=round(stderr, 1),
                  test_rows=len(test))  # fmt: skip
    text = json.dumps(result)
    print(text)
    common.write_results(
        f"mlm_plateau_{args.lang}_{args.family}" + (f"_{args.tag}" if args.tag else ""),
        quick=args.quick,
        result=result,
        markdown=f"```\n{text}\n```\n",
        headline={
            "gain_points": round(gain, 1),
            "gain_stderr_points": round(stderr, 1),
            "final_val_loss": result["val_loss"][-1][1],
        },
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()
