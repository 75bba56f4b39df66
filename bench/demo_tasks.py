"""Local lm-evaluation-harness tasks from the demo's held-out questions (runs/demo.sh), for `qwenlite report`:

    python bench/demo_tasks.py OUT        # OUT: the demo's folder; writes OUT/tasks/ and OUT/heldout.txt

- docstring_mc: "What does `name` do?" with four answers, the function's own docstring paragraph and three drawn
  from other held-out functions (fixed seed); accuracy and length-normalised accuracy;
- OUT/heldout.txt: the held-out answers as one text, for perplexity and KL.
Every question and answer comes from OUT/corpus/chat_eval.jsonl, the 1-in-20 held back from fine-tuning and
from the pretraining corpus's question set (the docstrings themselves are part of the library's source, which the
model read while pretraining: this measures recall of what it read, not generalisation).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TASK = """task: docstring_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def main(out: Path) -> None:
    pairs = []
    for line in (out / "corpus" / "chat_eval.jsonl").read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        pairs.append((user["content"], assistant["content"]))
    rng = random.Random(0)
    rows = []
    for i, (question, answer) in enumerate(pairs):
        others = rng.sample([a for j, (_, a) in enumerate(pairs) if j != i and a != answer], 3)
        choices = [answer, *others]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "docstring_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "docstring_mc.yaml").write_text(TASK.format(data=data))
    (out / "heldout.txt").write_text("\n\n".join(a for _, a in pairs) + "\n")
    print(f"{len(rows)} questions in {tasks}, {len(pairs)} answers in {out / 'heldout.txt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
