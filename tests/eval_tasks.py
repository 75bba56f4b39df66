"""Local lm-evaluation-harness tasks for the eval and report tests: a multiple-choice, a generation and a
perplexity task over a few lines of the tiny chat tokenizer's corpus (tests/tiny_chat.py)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 48  # short enough that the rolling task needs several windows and long contexts are truncated
QUESTIONS = [
    ("What is two plus two?", ["four", "six", "Paris"], 0),
    ("The capital of France is", ["Paris", "sunny", "four"], 0),
    ("Three plus three is", ["six", "four", "the weather"], 0),
    ("You are a helpful", ["assistant", "question", "Paris"], 0),
    # a context longer than MAX_LENGTH: both backends keep its last tokens
    ("The weather in Paris is sunny. " * 6 + "The weather is", ["sunny", "four"], 0),
]
TEXTS = [
    "The capital of France is Paris. The weather in Paris is sunny. " * 4,
    "What is two plus two? Two plus two is four. Three plus three is six.",
]

TASKS = {
    "tiny_mc": """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: DIR/mc.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "tiny_gen": """
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: DIR/mc.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: [".", "?"], max_gen_toks: 12, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    "tiny_ppl": """
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {test: DIR/text.jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
}


def write_tasks(folder: Path, names: list[str] | None = None) -> Path:
    """The data files and the YAML of `names` (default all three) in `folder`, for --include-path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for name in names or TASKS:
        (folder / f"{name}.yaml").write_text(TASKS[name].replace("DIR", str(folder)))
    return folder
