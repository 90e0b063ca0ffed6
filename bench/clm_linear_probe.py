"""How much label information the ladder's frozen CLM carries where the verbalizer reads it.

Prompt tuning (bench/ladder.py) reads the label from the final hidden state at the prompt's last
position, through the fixed direction of the two label words' output embeddings; the soft prompt
can only change that state through attention. This bench fits a logistic regression on the same
state instead (the zero-shot prompt of the ladder, no soft prompt, the CLM frozen), on N training
rows per seed, and scores the whole test split: what a learned readout of those features reaches,
next to the verbalizer's.

    .venv/bin/python bench/clm_linear_probe.py --lang sst2 --clm RUN/ladder-clm/clm/final [--n 300]
        [--ladder-seed-run RUN/ladder-s1]

``--ladder-seed-run``: also score the test rows with that ladder seed's ``zero_shot_none`` and
``prompt_tuning`` models and report, for each, the correlation of their verbalizer margins
(log p(first label word) - log p(second)) and the best accuracy any threshold on the margin
reaches on the test rows (an oracle: the most that calibrating that margin could give).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ladder  # noqa: E402


def _features(model: Any, tokenizer: Any, template: str, field: str, texts: list[str]) -> Any:
    """The final hidden state at the last prompt token, one unpadded pass per text (float64)."""
    import torch

    out = []
    limit = model.config.n_positions
    for text in texts:
        ids = tokenizer(template.format(**{field: text}), return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(ids[:, -limit:], output_hidden_states=True).hidden_states[-1]
        out.append(hidden[0, -1].double())
    return torch.stack(out)


def _fit_and_score(x: Any, y: Any, x_test: Any, y_test: Any, l2: float) -> float:
    """L2-regularised logistic regression on standardised features (LBFGS, float64)."""
    import torch

    mean, std = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        logits = (x - mean) / std @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    predicted = ((x_test - mean) / std @ w + b > 0).long()
    return float((predicted == y_test).double().mean())


def _margins(run: Path, rows: list[tuple[str, int]], field: str) -> dict[str, Any]:
    """Verbalizer margins of the ladder seed's zero-shot and prompt-tuned models on ``rows``."""
    import torch

    sys.path.insert(0, str(common.REPO))
    from mlsteps.engine.inference import load_for_inference
    from mlsteps.prompt.calibration import prompted_label_scores

    out = {}
    for name in ("zero_shot_none", "prompt_tuning"):
        loaded = load_for_inference(str(run / name / "final"))
        prompter = loaded.prompter
        prompts = [prompter.render({field: text}) for text, _ in rows]
        scores = prompted_label_scores(loaded.model, loaded.tokenizer, prompter, prompts)
        out[name] = torch.tensor([a - b for a, b in scores], dtype=torch.float64)
    return out


def _oracle_threshold(margin: Any, gold: Any, positive: int) -> float:
    """The best test accuracy of "margin > t means the first verbalizer label" over every t."""
    best = 0.0
    for t in [float("-inf"), *margin.tolist()]:
        predicted = (margin > t).long() * positive + (margin <= t).long() * (1 - positive)
        best = max(best, float((predicted == gold).double().mean()))
    return best


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lang", default="sst2", choices=list(ladder.LANGS))
    p.add_argument("--clm", required=True, help="the ladder's CLM (ladder-clm/clm/final)")
    p.add_argument("--n", type=int, default=300, help="labelled training rows per seed")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--l2", type=float, default=1e-2)
    p.add_argument("--ladder-seed-run", default=None, help="a ladder seed's run directory")
    args = p.parse_args()
    torch.set_num_threads(args.threads or 1)
    lang = ladder.LANGS[args.lang]
    model = AutoModelForCausalLM.from_pretrained(args.clm).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.clm)
    field = lang["text"]

    def feats(texts: list[str]) -> Any:
        return _features(model, tokenizer, lang["template"], field, texts)

    test = common.labelled_rows(lang["dir"], "test", lang["text"])
    x_test, y_test = feats([t for t, _ in test]), torch.tensor([y for _, y in test])
    train = common.labelled_rows(lang["dir"], "train", lang["text"])
    accs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        # The ladder's rows for this seed come from datasets' shuffle; these are another random
        # subset of the same size (the probe asks what the features hold, not which rows).
        rows = random.Random(seed).sample(train, args.n)
        x, y = feats([t for t, _ in rows]), torch.tensor([label for _, label in rows])
        accs.append(_fit_and_score(x, y, x_test, y_test, args.l2))
    majority = max(sum(y_test.tolist()), len(test) - sum(y_test.tolist())) / len(test)
    s = ladder.summarize(accs)
    text = (
        f"# bench/clm_linear_probe.py --lang {args.lang} --n {args.n}\n\n"
        f"CLM {args.clm}: logistic regression on the last prompt position's final hidden state, "
        f"{args.n} rows, seeds {args.seeds}: test accuracy {s['mean']:.3f} ± {s['std']:.3f} "
        f"({s['min']:.3f}..{s['max']:.3f}); majority baseline {majority:.3f}."
    )
    extra: dict[str, Any] = {}
    if args.ladder_seed_run:
        margins = _margins(Path(args.ladder_seed_run), test, field)
        positive = int(next(iter(lang["verbalizer"])))  # the first verbalizer label's value
        z, pt = margins["zero_shot_none"], margins["prompt_tuning"]
        extra = {
            "margin_correlation": float(torch.corrcoef(torch.stack([z, pt]))[0, 1]),
            "oracle_threshold_zero_shot": _oracle_threshold(z, y_test, positive),
            "oracle_threshold_prompt_tuning": _oracle_threshold(pt, y_test, positive),
        }
        text += (
            f" Verbalizer margins ({args.ladder_seed_run}): correlation zero-shot / prompt-tuned "
            f"{extra['margin_correlation']:.3f}; best accuracy of any threshold on the test rows: "
            f"zero-shot {extra['oracle_threshold_zero_shot']:.3f}, prompt-tuned "
            f"{extra['oracle_threshold_prompt_tuning']:.3f}."
        )
    print(text)
    common.write_results(
        f"clm_linear_probe_{args.lang}",
        quick=args.quick,
        result={
            "accuracy": s,
            "per_seed": accs,
            "majority": majority,
            "clm": args.clm,
            "n": args.n,
            "l2": args.l2,
        },  # fmt: skip
        markdown=text,
        headline={"accuracy": round(s["mean"], 3), "majority": round(majority, 3)},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()
