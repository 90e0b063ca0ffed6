"""Is the ladder's MLM start worse than scratch, or is it noise? Fine-tune variants, one at a time.

Takes the MLM checkpoint (and its tokenizer) that ``bench/ladder.py`` pretrained through mlsteps
and fine-tunes it for sentiment on N = 300 training rows in a plain PyTorch loop, against the
same architecture from scratch: 5 seeds, scored on the whole test split, with the standard error
of the gain (so a difference can be told from the seed-to-seed spread). One variant per run:

    .venv/bin/python bench/mlm_start_probe.py --lang zh_reviews \\
        --mlm /tmp/mlsteps-bench-cache/ladder/zh_reviews/runs/ladder-mlm/mlm/final \\
        --variant '{"select_on_dev": true}'

Variant keys (JSON): ``lr`` (both starts), ``lr_pretrained`` (only the MLM start), ``steps``,
``select_on_dev`` (keep the state with the best accuracy on 300 dev rows, checked every 15
steps), ``freeze_embeddings`` (MLM start only: its token embeddings stay as pretrained),
``whole_model`` (load the MLM checkpoint's prediction head into the classifier's ``head`` too,
as ``from_pretrained`` of the classification class does), ``clip`` (gradient norm 1.0),
``cosine`` (cosine instead of linear decay), ``pretrained_only`` (skip the scratch runs),
``reinit_layers`` (MLM start: the top k encoder layers and the final norm start fresh, as in
Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning"), ``keep`` (``"embeddings"``: only
the token embeddings come from the MLM, every layer starts fresh; ``"layers"``: the opposite),
``dropout`` (both starts: embedding, attention, MLP and classifier dropout).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEQ = 64
BATCH = 16


def _rows(lang: str, split: str) -> list[tuple[str, int]]:
    return common.labelled_rows(lang, split, "sentence" if lang == "sst2" else "text")


def _accuracy(model: Any, encode: Any, rows: list[tuple[str, int]]) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(**encode(rows[i : i + 128])).logits.argmax(-1) for i in range(0, len(rows), 128)]
        )
    model.train()
    return float((predicted == torch.tensor([label for _, label in rows])).float().mean())


def _model(mlm: str, pretrained: bool, v: dict[str, Any]) -> Any:
    import transformers as tf

    if pretrained and v.get("whole_model"):
        return tf.ModernBertForSequenceClassification.from_pretrained(mlm, num_labels=2)
    rate = float(v.get("dropout", 0.0))
    config = tf.AutoConfig.from_pretrained(mlm, num_labels=2, embedding_dropout=rate,
                                           attention_dropout=rate, mlp_dropout=rate,
                                           classifier_dropout=rate)  # fmt: skip
    model = tf.ModernBertForSequenceClassification(config)
    if pretrained:
        fresh = {k: t.clone() for k, t in model.model.state_dict().items()}
        state = tf.ModernBertForMaskedLM.from_pretrained(mlm).model.state_dict()
        n, k = config.num_hidden_layers, int(v.get("reinit_layers", 0))
        top = tuple(f"layers.{i}." for i in range(n - k, n)) + (("final_norm",) if k else ())
        for key in state:
            embedding = key.startswith("embeddings.")
            if (
                key.startswith(top)
                or (v.get("keep") == "embeddings" and not embedding)
                or (v.get("keep") == "layers" and embedding)
            ):
                state[key] = fresh[key]
        model.model.load_state_dict(state)
        if v.get("freeze_embeddings"):
            model.model.embeddings.tok_embeddings.weight.requires_grad_(False)
    return model


def finetune(
    args: Any, tok: Any, pretrained: bool, seed: int, data: dict[str, list], v: dict
) -> float:
    import torch

    torch.manual_seed(seed)
    model = _model(args.mlm, pretrained, v)
    lr = v.get("lr_pretrained", v.get("lr", 1e-3)) if pretrained else v.get("lr", 1e-3)
    steps = v.get("steps", 150)
    subset = random.Random(seed).sample(data["train"], args.n)

    def encode(rows: list) -> Any:
        enc = tok([t for t, _ in rows], truncation=True, max_length=SEQ, padding=True,
                  return_tensors="pt")  # fmt: skip
        enc.pop("token_type_ids", None)
        return enc

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(s: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * s / steps)) if v.get("cosine") else 1 - s / steps
        return min(1.0, (s + 1) / 10) * max(0.0, decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    best: tuple[float, Any] = (-1.0, None)
    model.train()
    for step in range(steps):
        batch = [subset[(step * BATCH + j) % args.n] for j in range(BATCH)]
        model(**encode(batch), labels=torch.tensor([label for _, label in batch])).loss.backward()
        if v.get("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if v.get("select_on_dev") and (step + 1) % 15 == 0:
            score = _accuracy(model, encode, data["dev"])
            if score > best[0]:
                best = (score, copy.deepcopy(model.state_dict()))
    if best[1] is not None:
        model.load_state_dict(best[1])
    return _accuracy(model, encode, data["test"])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lang", default="zh_reviews", choices=["sst2", "zh_reviews"])
    p.add_argument("--mlm", required=True, help="the ladder's MLM final/ directory")
    p.add_argument("--variant", default="{}", help="JSON object, keys in the docstring")
    p.add_argument("--n", type=int, default=300, help="labelled training rows")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    common.setup_threads(args.threads or 1)
    from transformers import AutoTokenizer

    variant = json.loads(args.variant)
    tok = AutoTokenizer.from_pretrained(args.mlm)
    data = {"train": _rows(args.lang, "train"), "dev": _rows(args.lang, "dev")[:300],
            "test": _rows(args.lang, "test")}  # fmt: skip
    seeds = range(1, 2 if args.quick else args.seeds + 1)
    starts = [True] if variant.get("pretrained_only") else [True, False]
    result: dict[str, Any] = {"variant": variant, "lang": args.lang, "n": args.n,
                              "test_rows": len(data["test"])}  # fmt: skip
    for pretrained in starts:
        key = "pretrained" if pretrained else "scratch"
        result[key] = [finetune(args, tok, pretrained, s, data, variant) for s in seeds]
    if "scratch" in result and len(result["scratch"]) > 1:
        a, b = result["pretrained"], result["scratch"]
        result["gain_points"] = round(100 * (float(np.mean(a)) - float(np.mean(b))), 1)
        result["gain_stderr_points"] = round(
            100 * math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)), 1
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
