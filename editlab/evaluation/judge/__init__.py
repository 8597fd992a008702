"""Judged benchmarks: GEdit-Bench and ImgEdit-Bench scored by a vision-language judge, reproducibly.

`protocols` (the original scorers' prompts, image transport and strict parsers), `backends` (scripted,
openai_compat, transformers), `record` (the append-only judge_calls.jsonl and judge.json), `scoring` (judging items
with bounded retries, resumable), `summary` (per type, macro and micro), `layouts` (the folders the CLI reads),
`metric` (the metric sets run.py uses) and `cli` (``python -m editlab.evaluation.judge``, ``editlab-judge``).
"""
