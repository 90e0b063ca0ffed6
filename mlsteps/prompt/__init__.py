"""Prompt learning, used by the prompt stage and by every stage that reads a prompted model.

- prompter.py: hard prompts (templates, few-shot demonstrations) and the prompted-model file
  (torch-free: ``validate`` reads it).
- scoring.py: prompt + answer tokenisation, likelihood scoring, calibrated rank classification.
- soft_prompt.py: peft prompt/prefix/p-tuning on a frozen base, trained through the verbalizer.

The stage itself is ``mlsteps/stages/prompt/`` (every stage kind is dispatched as
``mlsteps.stages.<kind>``): its rows, hard-prompt results and soft-prompt training.
"""
