"""One error family (errors.py): each kind of bad input raises the subclass that names it, every one of them is a
QwenliteError (one line from the CLI, a 4xx from the server), and the value errors stay ValueErrors for callers
that caught those before."""

from __future__ import annotations

import pytest
import torch

from qwenlite.cli.main import main
from qwenlite.errors import CheckpointError, ContextLengthExceeded, InvalidArgument, QwenliteError
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.model.cache import make_cache
from qwenlite.model.runner import run_model
from qwenlite.ops import quant_matmul as qm
from qwenlite.sample import SamplingParams

from helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_checkpoint(tiny_checkpoint(tmp_path_factory), "float32").model


def test_the_family():
    for kind in (CheckpointError, InvalidArgument, ContextLengthExceeded):
        assert issubclass(kind, QwenliteError)
    assert issubclass(InvalidArgument, ValueError) and issubclass(ContextLengthExceeded, ValueError)
    assert not issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("tokens", [[5, 6, 7, 8, 9], [5]])  # a prompt (the forward) and a decode step (one C call)
def test_a_full_cache_is_a_context_error(model, tokens):
    cache = make_cache(model.config, 1, 4, model.dtype)
    with torch.inference_mode():
        run_model(model, torch.tensor([[1, 2, 3, 4]]), cache)
        with pytest.raises(ContextLengthExceeded, match="do not fit a cache of 4"):
            run_model(model, torch.tensor([tokens]), cache)


def test_out_of_range_values_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=1.5).validate()
    with pytest.raises(InvalidArgument, match="int4 group size"):
        qm.quantize_int4(torch.randn(64, 96), 48, torch.float32)


def test_a_directory_without_a_checkpoint_is_a_checkpoint_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    assert main(["run", str(tmp_path), "hello"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenlite: error: no config.json"), lines
