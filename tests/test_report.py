"""`qwenlite report`: every variant measured as the commands that measure it alone (perplexity, KL, bench, harness
tasks), the files agreeing with each other (report.md's table and both plots drawn from report.json), the density
columns by their definition, the Pareto front, and bad input refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest

from qwenlite.cli.main import main
from qwenlite.errors import InvalidArgument, QwenliteError
from qwenlite.eval.perplexity import perplexity
from qwenlite.report import Measured, markdown, pareto, report

from eval_tasks import write_tasks
from helpers import TINY_TEXT_CONFIG
from tiny_chat import make_chat_checkpoint
from train_helpers import single_threaded

TEXT_CONFIG = dict(TINY_TEXT_CONFIG, hidden_size=128, intermediate_size=256, head_dim=32, linear_value_head_dim=32)
TEXT = "The capital of France is Paris. The weather in Paris is sunny. Two plus two is four. " * 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(checkpoint, text file, task folder, report folder, report dict): fp32, int8 and int4 of a tiny model."""
    root = tmp_path_factory.mktemp("report")
    model = root / "model"
    make_chat_checkpoint(model, text_config=TEXT_CONFIG)
    text = root / "text.txt"
    text.write_text(TEXT)
    tasks = write_tasks(root / "tasks", ["tiny_mc"])
    out = root / "out"
    result = report(str(model), "fp32,int8,int4", str(text), str(out), ctx=64, tasks=["tiny_mc"],
                    include_path=str(tasks), prompt=16, decode=4)  # fmt: skip
    return model, text, tasks, out, result


def test_each_variant_is_measured_as_the_commands_measure_it(made):
    model, text, _, _, result = made
    fp32, int8, int4 = (Measured(**v) for v in result["variants"])
    assert [v.precision for v in (fp32, int8, int4)] == ["float32", "int8", "int4"]
    alone = perplexity(str(model), text, 64, "float32", "int8", str(model), "float32", None, progress=False)
    assert int8.perplexity == pytest.approx(alone.perplexity, rel=1e-9)
    assert int8.kl_mean == pytest.approx(alone.divergence.kl_mean, rel=1e-9)
    assert fp32.kl_mean is None and 0 < int8.kl_mean < int4.kl_mean  # int4 further from fp32 than int8
    assert fp32.weight_gb > int8.weight_gb > int4.weight_gb > 0 and fp32.disk_gb is None
    for v in (fp32, int8, int4):
        assert 0 <= v.tasks["tiny_mc"] <= 1 and v.score == v.tasks["tiny_mc"] and v.decode_tok_s > 0
        assert v.score_per_gb == pytest.approx(v.score / v.weight_gb)
        error = 1 - v.score
        assert v.density == (pytest.approx(-math.log(error) / v.weight_gb) if error else math.inf)


def test_the_files_agree(made):
    *_, out, result = made
    assert json.loads((out / "report.json").read_text()) == result
    md = (out / "report.md").read_text()
    assert md == markdown(result)
    for v in result["variants"]:
        assert f"| {v['name']}" in md and f"{v['perplexity']:.4f}" in md and f"{v['decode_tok_s']:.1f}" in md
    assert "PrismML" in md
    for name in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in md


def test_pareto_front():
    # (cost, quality): the cheapest, the best, and one between on the front; one dominated; a tie stays
    points = [(1.0, 0.5), (4.0, 0.9), (2.0, 0.7), (3.0, 0.6), (2.0, 0.7)]
    assert pareto(points) == [True, True, True, False, True]


def test_bad_input_writes_nothing(made, tmp_path, capsys):
    model, text, *_ = made
    with pytest.raises(InvalidArgument, match="variant 'int3'"):
        report(str(model), "fp32,int3", str(text), str(tmp_path / "a"))
    with pytest.raises(QwenliteError, match="no such file"):
        report(str(model), "fp32,int8", str(tmp_path / "missing.txt"), str(tmp_path / "b"))
    assert main(["report", str(model), "--text", str(text), "--variants", "fp32,fp32", "--out", str(tmp_path / "c")])
    assert "twice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
