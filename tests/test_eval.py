"""`qwenlite eval`: the same local tasks through qwenlite's harness model and through the harness's own `hf` backend
(transformers) on one tiny checkpoint give the same metrics: multiple choice (acc, acc_norm), generate_until (exact
match, greedy with stop strings), loglikelihood_rolling (word and byte perplexity, bits per byte); and each
request's scores agree: log-likelihoods to 1e-4 absolute (fp32 on both sides; qwenlite prefills the context and
scores the continuation from its cache, transformers runs the whole sequence at once), greedy flags and generated
text exactly. Bad input: an unknown task (with the closest names), a missing include path, one line each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from qwenlite.cli.main import main
from qwenlite.errors import QwenliteError
from qwenlite.eval import harness

from eval_tasks import MAX_LENGTH, write_tasks
from helpers import TINY_TEXT_CONFIG
from tiny_chat import make_chat_checkpoint
from train_helpers import single_threaded


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():  # see train_helpers: a neighbour on the other core stalls two-thread OpenMP
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint directory, task directory): the tiny chat checkpoint (tokenizer of ~480 ids) and three tasks."""
    root = tmp_path_factory.mktemp("eval")
    model = root / "model"
    make_chat_checkpoint(model, text_config=dict(TINY_TEXT_CONFIG, max_position_embeddings=MAX_LENGTH))
    tasks = write_tasks(root / "tasks")
    return model, tasks


def run_both(model, tasks, names: list[str]) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate

    ours = harness.evaluate(
        str(model), names, str(tasks), dtype="float32", log_samples=True, bootstrap_iters=0, batch_size=2
    )  # three choices: two in one forward, then the context restored for one
    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={model},dtype=float32,max_length={MAX_LENGTH}", tasks=names,
        task_manager=harness.task_manager(str(tasks), names), log_samples=True, bootstrap_iters=0, device="cpu",
    )  # fmt: skip
    return ours, theirs


def test_eval_equals_the_harness_hf_backend(setup):
    model, tasks = setup
    names = ["tiny_mc", "tiny_gen", "tiny_ppl"]
    ours, theirs = run_both(model, tasks, names)
    for name in names:
        a, b = ours["results"][name], theirs["results"][name]
        metrics = [k for k, v in b.items() if isinstance(v, float | int) and "stderr" not in k]
        assert metrics, b
        for key in metrics:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (name, key, a[key], b[key])
        for x, y in zip(ours["samples"][name], theirs["samples"][name], strict=True):
            for r, s in zip(x["resps"], y["resps"], strict=True):
                if name == "tiny_gen":
                    assert r == s
                elif name == "tiny_mc":
                    assert r[0][0] == pytest.approx(s[0][0], abs=1e-4) and r[0][1] == s[0][1]
                else:
                    assert r[0] == pytest.approx(s[0], abs=1e-4)
    # the metrics are not degenerate: some choices right, some wrong; the texts have finite perplexity
    assert 0 < ours["results"]["tiny_mc"]["acc,none"] < 1
    assert math.isfinite(ours["results"]["tiny_ppl"]["word_perplexity,none"])


def test_eval_cli_writes_the_results_json(setup, tmp_path, capsys):
    model, tasks = setup
    out = tmp_path / "results.json"
    argv = ["eval", str(model), "--tasks", "tiny_mc", "--include-path", str(tasks), "--output-path", str(out),
            "--dtype", "float32", "--limit", "3"]  # fmt: skip
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert written["results"]["tiny_mc"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)
    assert "tiny_mc" in capsys.readouterr().out  # the harness's table


def test_unknown_task_names_the_closest(setup, capsys):
    model, tasks = setup
    with pytest.raises(QwenliteError, match="unknown task 'tiny_mcq'; did you mean tiny_mc"):
        harness.evaluate(str(model), ["tiny_mcq"], str(tasks))
    code = main(["eval", str(model), "--tasks", "tiny_mc", "--include-path", str(tasks / "nope")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "no such directory" in err, err


def test_a_task_that_needs_the_network_offline_is_one_line(setup):
    """A registry task downloads its dataset from the hub; offline (HF_HUB_OFFLINE, read when `datasets` is
    imported: hence a process of its own) that is one line naming --include-path, nothing written."""
    model, tasks = setup
    out = tasks.parent / "never.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "qwenlite", "eval", str(model), "--tasks", "arc_easy", "--limit", "2",
            "--output-path", str(out)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and lines and "--include-path" in lines[-1] and "Traceback" not in done.stderr
    assert lines[-1].startswith("qwenlite: error:") and not out.exists()


def test_batch_size_changes_nothing_but_speed(setup):
    """Choices scored one per forward, two per forward (a context's state restored between batches, as the
    transformers comparison above runs them) or all at once score the same, to fp32 rounding."""
    model, tasks = setup
    runs = [harness.evaluate(str(model), ["tiny_mc"], str(tasks), dtype="float32", log_samples=True, batch_size=b,
                             bootstrap_iters=0)["samples"]["tiny_mc"] for b in (1, 8)]  # fmt: skip
    for one, two in zip(*runs, strict=True):
        for r, s in zip(one["resps"], two["resps"], strict=True):
            assert r[0][0] == pytest.approx(s[0][0], abs=1e-5) and r[0][1] == s[0][1]
    with pytest.raises(QwenliteError, match="batch size must be at least 1"):
        harness.evaluate(str(model), ["tiny_mc"], str(tasks), batch_size=0)


def test_cache_resumes_without_scoring_again(setup, tmp_path, monkeypatch):
    """--cache PREFIX keeps every finished request (the harness's SQLite cache): a rerun takes them from there, so
    an interrupted evaluation resumes where it stopped, and gives the same results."""
    model, tasks = setup
    prefix = str(tmp_path / "cache")
    kwargs = dict(dtype="float32", use_cache=prefix, bootstrap_iters=0, limit=3)
    first = harness.evaluate(str(model), ["tiny_mc"], str(tasks), **kwargs)
    assert list(tmp_path.glob("cache*.db"))

    def refuse(*args, **kw):
        raise AssertionError("a cached request was scored again")

    monkeypatch.setattr(harness.QwenliteLM, "_loglikelihood_tokens", refuse)
    again = harness.evaluate(str(model), ["tiny_mc"], str(tasks), **kwargs)
    assert again["results"]["tiny_mc"]["acc,none"] == first["results"]["tiny_mc"]["acc,none"]
