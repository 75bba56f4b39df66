"""`qwenlite bench`: every figure it promises is there and consistent with the others, for a checkpoint, a
quantized checkpoint and quantization on load; bad flags are one-line errors."""

from __future__ import annotations

import json

import pytest

from qwenlite.cli import main
from qwenlite.io.quantized import quantize_checkpoint

from helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def bench_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--prompt", "24", "--decode", "6", "--repeat", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_consistent(r: dict, precision: str) -> None:
    assert r["precision"] == precision
    assert r["prompt_tokens"] == 24 and r["decode_tokens"] == 6
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["time_to_first_token_s"] > 0
    assert abs(r["prefill_tok_s"] * r["time_to_first_token_s"] - 24) < 1e-6 * 24
    assert 0 < r["bytes_per_token"] <= r["weight_bytes"]
    assert r["bandwidth_gb_s"] > 0.1
    assert r["decode_limit_tok_s"] == pytest.approx(r["bandwidth_gb_s"] * 1e9 / r["bytes_per_token"])
    assert r["limit_ratio"] == pytest.approx(r["decode_tok_s"] / r["decode_limit_tok_s"])
    assert r["peak_rss_bytes"] > r["rss_before_load_bytes"] > 0


def test_bench_reports_every_figure(tiny, capsys, tmp_path):
    plain = bench_json(capsys, str(tiny))
    check_consistent(plain, "float32")
    # The tiny checkpoint's head is untied: a decode step reads all of it but the embedding's 248K rows.
    embed_bytes = 248320 * 128 * 4
    assert plain["weight_bytes"] - plain["bytes_per_token"] == embed_bytes

    int4 = bench_json(capsys, str(tiny), "--quant", "int4")
    check_consistent(int4, "int4")
    assert int4["weight_bytes"] < plain["weight_bytes"] / 4

    quantized = quantize_checkpoint(tiny, tmp_path / "int8", bits=8, progress=False)
    int8 = bench_json(capsys, str(quantized))
    check_consistent(int8, "int8")
    assert plain["weight_bytes"] / 4.2 < int8["weight_bytes"] < plain["weight_bytes"] / 3.5


def test_bench_table_and_bad_flags(tiny, capsys):
    assert main(["bench", str(tiny), "--prompt", "8", "--decode", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("prefill (8 tok)", "decode (2 tok)", "time to first token", "memory bandwidth", "decode / limit",
                  "peak resident memory"):  # fmt: skip
        assert label in out, label
    assert main(["bench", str(tiny), "--decode", "0"]) == 1
    assert "--decode must be at least 1" in capsys.readouterr().err
    assert main(["bench", str(tiny / "missing")]) == 1


def test_bench_a_tiny_vocabulary(tmp_path, capsys):
    """A checkpoint with fewer than 1000 tokens (a transformers test model) is benchmarked too, its prompt drawn from
    its own vocabulary; also which kernels ran is named."""
    from qwenlite.ops.cpu import kernels

    from helpers import make_hf_checkpoint

    make_hf_checkpoint(tmp_path)  # vocabulary of 512
    r = bench_json(capsys, str(tmp_path))
    check_consistent(r, "float32")
    assert r["kernels"] == kernels.isa_label() and r["kernels"].startswith(kernels.isa())
