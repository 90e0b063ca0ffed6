"""lm-evaluation-harness tasks in the eval stage (``lm_eval:``), through lm-eval's own API.

Each model of the stage is handed to ``lm_eval.models.huggingface.HFLM`` by path (a LoRA
adapter through HFLM's ``peft`` argument, on the base model its adapter_config names), and
scored by ``lm_eval.simple_evaluate`` with lm-eval's default seeds, so every number equals the
``lm_eval`` command line given in its convention string. Nothing of lm-eval's is re-implemented:
the metric names (``acc,none``: metric, comma, filter), the filters, the task versions and the
documents counted are lm-eval's, stored as they come.

Ladder keys are ``<task>/<metric>,<filter>`` on lm-eval's own scale (accuracy 0-1, perplexity
as is); ``<task>/lm_eval_convention`` holds the lm-eval version, task version, shots, documents,
chat template, the standard errors and the equivalent command line.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from mlsteps.errors import HERE, UserError, did_you_mean, first_line
from mlsteps.recipe.specs.evaluate import LM_EVAL_KINDS, LmEvalSpec

_KIND_NAMES = {"mlm": "a masked LM", "classification": "a sequence classifier"}


def check_models(infos: dict[str, Any]) -> None:
    """Refuse, before any work, the models lm-eval's HF class cannot score (the recipe check in
    stage_kinds only knows earlier stages; this one reads the configs of directories too)."""
    from mlsteps.distributed import is_distributed

    if is_distributed():  # HFLM would split the requests over the ranks its own way (untested)
        raise UserError(
            "lm_eval runs in a single process",
            field="lm_eval",
            hint="run this eval stage without --nproc-per-node (e.g. mlsteps run R --only STAGE)",
        )
    for index, (label, info) in enumerate(infos.items()):
        # A fine-tune's own template (method 'finetune') is a habit of its data, not part of the
        # model: lm-eval scores its weights with each task's prompts, as for any model.
        if info.prompter is not None and info.prompter.method != "finetune":
            raise UserError(
                f"lm_eval cannot score the prompted model '{label}': lm-eval renders each "
                "task's own prompts and its HF class cannot take soft prompts",
                field=f"models.{index}",
                hint="evaluate the prompt's base model with lm_eval, or this model with "
                "'metrics' in an eval stage without lm_eval",
            )
        if info.kind not in LM_EVAL_KINDS:
            raise UserError(
                f"lm_eval cannot score '{label}', {_KIND_NAMES.get(info.kind, info.kind)}: "
                "lm-eval's HF class scores causal LMs and seq2seq models",
                field=f"models.{index}",
                hint="give lm_eval a causal LM (or its LoRA adapter) or a seq2seq model",
            )


def include_dir(spec: LmEvalSpec) -> Path | None:
    """The include_path directory (relative to the working directory), or None."""
    if spec.include_path is None:
        return None
    path = Path(spec.include_path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(
            f"lm_eval.include_path '{spec.include_path}' is not a directory",
            field="lm_eval.include_path",
            hint="point at the directory holding the task YAML files",
        )
    return path


def task_manager(spec: LmEvalSpec) -> Any:
    """lm-eval's TaskManager with include_path; UserError for a task name it does not know.

    Indexing lm-eval's own ~15,000 task names takes half a minute on a small CPU: when every
    task is found in include_path, only that directory is indexed (the tasks are the same
    objects either way)."""
    from lm_eval.tasks import TaskManager

    include = include_dir(spec)
    if include is not None:
        manager = TaskManager(include_path=str(include), include_defaults=False)
        if all(manager.match_tasks([name]) for name in spec.tasks):
            return manager
    manager = TaskManager(include_path=str(include) if include else None)
    for i, name in enumerate(spec.tasks):
        if not manager.match_tasks([name]):
            hint = did_you_mean(name, manager.all_tasks) or (
                "list lm-eval's tasks with `python -m lm_eval ls tasks`"
                + (f" (with --include_path {include})" if include else "")
            )
            raise UserError(f"unknown lm-eval task '{name}'", field=f"lm_eval.tasks.{i}", hint=hint)
    return manager


def _tokenizer_source(info: Any) -> str:
    """The tokenizer next to the adapter when it has one (the finetune stage saves it there),
    else the model's: the same choice as mlsteps' own inference loading."""
    for source in (info.adapter_source, info.model_source):
        path = Path(source) if source else None
        if path and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return str(source)
    return str(info.model_source)


def command_line(spec: LmEvalSpec, info: Any, device: str, trust_remote_code: bool) -> str:
    """The ``lm_eval`` command line whose numbers this run equals."""
    args = [f"pretrained={info.model_source}", "dtype=float32"]
    if trust_remote_code:
        args.append(f"trust_remote_code={trust_remote_code}")  # only when the recipe asks
    if info.adapter_source:
        args.append(f"peft={info.adapter_source}")
    tokenizer = _tokenizer_source(info)
    if tokenizer != info.model_source:
        args.append(f"tokenizer={tokenizer}")
    if info.kind == "seq2seq":
        args.append("backend=seq2seq")
    cmd = ["lm_eval", "--model", "hf", "--model_args", ",".join(args)]
    cmd += ["--tasks", ",".join(spec.tasks), "--batch_size", str(spec.batch_size)]
    cmd += ["--device", device]
    if spec.include_path:
        cmd += ["--include_path", str(Path(spec.include_path).expanduser().resolve())]
    if spec.num_fewshot is not None:
        cmd += ["--num_fewshot", str(spec.num_fewshot)]
    if spec.limit is not None:
        cmd += ["--limit", str(spec.limit)]
    if spec.apply_chat_template:
        cmd.append("--apply_chat_template")
    return shlex.join(cmd)


def evaluate(
    spec: LmEvalSpec, info: Any, manager: Any, *, trust_remote_code: bool
) -> dict[str, Any]:
    """lm-eval's results for one model (a SourceInfo), as ladder cells."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = HFLM(
            pretrained=info.model_source,
            peft=info.adapter_source,
            tokenizer=_tokenizer_source(info),
            backend="seq2seq" if info.kind == "seq2seq" else "causal",
            dtype="float32",  # mlsteps' own evaluation scores fp32 weights too
            device=device,
            batch_size=spec.batch_size,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"lm-eval cannot load model '{info.source}': {first_line(exc)}", field=HERE
        ) from None
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        apply_chat_template=spec.apply_chat_template,
        task_manager=manager,
        log_samples=False,
        confirm_run_unsafe_code=spec.confirm_run_unsafe_code,
    )
    del model
    if results is None:  # only non-zero ranks of a distributed lm-eval run get None
        return {}
    return cells(results, spec, command_line(spec, info, device, trust_remote_code))


def cells(results: dict[str, Any], spec: LmEvalSpec, command: str) -> dict[str, Any]:
    """``simple_evaluate``'s results as ladder cells: every ``metric,filter`` number of every
    task and group under ``<task>/``, and one convention string per task."""
    import lm_eval

    out: dict[str, Any] = {}
    for task, values in results["results"].items():
        stderrs = []
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):  # a number, or 'N/A' (one document, no bootstrap)
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                stderrs.append(f"{metric.removesuffix('_stderr')},{filt} ± {shown}")
            elif filt and isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{task}/{key}"] = value  # not alias, name, sample_len: no filter, no metric
        samples = results.get("n-samples", {}).get(task)
        docs = (
            f"{samples['effective']} of {samples['original']} documents"
            if isinstance(samples, dict)
            else "documents of its subtasks"
        )
        shots = results.get("n-shot", {}).get(task)
        parts = [
            f"lm-eval {lm_eval.__version__}",
            f"task {task} version {results.get('versions', {}).get(task, '?')}",
            f"{shots}-shot" if shots is not None else "shots of its subtasks",
            docs + (f" (limit {spec.limit})" if spec.limit is not None else ""),
            f"chat template {'applied' if spec.apply_chat_template else 'not applied'}",
            "metric,filter as lm-eval names them, on its scale",
        ]
        if stderrs:
            parts.append("stderr " + "; ".join(stderrs))
        parts.append(f"equals: {command}")
        out[f"{task}/lm_eval_convention"] = "; ".join(parts)
    return out  # a non-finite number becomes null + '_error' when metrics.json is written
