"""Checkpoint reading and writing: name sanitising, strict loading with errors that name the problem,
save -> load round trips (also through transformers), and memory-mapped loading."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwenlite.config import ModelConfig
from qwenlite.errors import CheckpointError
from qwenlite.io.checkpoint import load_checkpoint, sanitize, save_checkpoint
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM

from helpers import INDEX_FILE, make_hf_checkpoint, make_hf_model, max_abs_diff, random_ids, reference_logits

SHARD_BYTES = 20_000  # the tiny model is ~0.6 MB: this writes dozens of shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (checkpoint dir, the transformers model that wrote it)."""
    kinds = {
        "single": dict(),
        "sharded": dict(shard_bytes=SHARD_BYTES),
        "untied": dict(tied=False),
        "published": dict(layout="conditional_generation", shard_bytes=SHARD_BYTES, add_mtp=True),
    }
    out = {}
    for name, kwargs in kinds.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_hf_checkpoint(path, **kwargs))
    return out


@pytest.fixture(scope="module")
def sources(built):
    """Pristine checkpoints, never modified: tests that corrupt one work on a copy."""
    return {kind: path for kind, (path, _) in built.items()}


@pytest.fixture
def copy_of(sources, tmp_path):
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(sources[kind], tmp_path / kind))

    return copy


@torch.no_grad()
def logits(model, ids):
    return model(ids)


IDS = random_ids(2, 70, seed=9)


# --- sanitize -----------------------------------------------------------------------------------------------------

RAW = {
    "model.language_model.embed_tokens.weight": 1,
    "model.language_model.layers.0.linear_attn.A_log": 2,
    "model.language_model.layers.3.self_attn.q_norm.weight": 3,
    "model.language_model.norm.weight": 4,
    "lm_head.weight": 5,
    "model.visual.blocks.0.attn.qkv.weight": 6,
    "model.visual.merger.linear_fc1.weight": 7,
    "mtp.fc.weight": 8,
    "mtp.layers.0.self_attn.q_proj.weight": 9,
}


def test_sanitize_maps_names():
    text, mtp = sanitize(RAW)
    assert text == {
        "model.embed_tokens.weight": 1,
        "model.layers.0.linear_attn.A_log": 2,
        "model.layers.3.self_attn.q_norm.weight": 3,
        "model.norm.weight": 4,
        "lm_head.weight": 5,
    }
    assert mtp == {"mtp.fc.weight": 8, "mtp.layers.0.self_attn.q_proj.weight": 9}


def test_sanitize_is_idempotent():
    text, mtp = sanitize(RAW)
    assert sanitize(text) == (text, {})
    assert sanitize({**text, **mtp}) == (text, mtp)
    assert sanitize({}) == ({}, {})


def test_sanitize_keeps_values():
    value = torch.zeros(3)
    text, _ = sanitize({"model.language_model.norm.weight": value})
    assert text["model.norm.weight"] is value


@pytest.mark.parametrize("tied", [True, False])
def test_sanitized_published_names_are_the_model_names(tied):
    """Every text tensor of the published layout lands on a qwenlite parameter, and nothing else does."""
    hf = make_hf_model(layout="conditional_generation", tied=tied)
    text, mtp = sanitize(dict(hf.state_dict()))
    assert mtp == {}
    config = ModelConfig.from_dict(hf.config.to_dict())
    with torch.device("meta"):
        ours = Qwen3_5ForCausalLM(config)
    expected = set(ours.state_dict())
    if tied:  # transformers' state_dict lists the tied head too; the saved file does not
        assert text.keys() - {"lm_head.weight"} == expected - {"lm_head.weight"}
    else:
        assert set(text) == expected


# --- strict loading: errors name the problem ----------------------------------------------------------------------


def rewrite(file: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict, write it back."""
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def shard_of(checkpoint: Path, name: str) -> Path:
    index = checkpoint / INDEX_FILE
    if index.is_file():
        return checkpoint / json.loads(index.read_text())["weight_map"][name]
    return checkpoint / "model.safetensors"


def test_missing_config(copy_of):
    path = copy_of("single")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(path)


def test_unknown_model_type(copy_of):
    path = copy_of("single")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "llama" in message
    assert "qwen3_5" in message and "qwen3_5_text" in message  # lists what is supported


def test_no_safetensors_file(copy_of):
    path = copy_of("single")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


def test_index_lists_a_missing_shard(copy_of):
    path = copy_of("sharded")
    shard = shard_of(path, "model.layers.2.linear_attn.A_log")
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("keep", [0.5, 6], ids=["data-cut", "header-cut"])
def test_truncated_safetensors(copy_of, kind, keep):
    path = copy_of(kind)
    file = shard_of(path, "model.layers.1.mlp.up_proj.weight")
    size = file.stat().st_size
    os.truncate(file, int(size * keep) if keep < 1 else keep)
    with pytest.raises(CheckpointError, match=file.name):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "kind,stored,reported",
    [
        ("single", "model.layers.1.linear_attn.A_log", "model.layers.1.linear_attn.A_log"),
        ("sharded", "model.layers.3.self_attn.k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("untied", "lm_head.weight", "lm_head.weight"),
        ("published", "model.language_model.layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.weight"),
    ],
)
def test_missing_tensor(copy_of, kind, stored, reported):
    path = copy_of(kind)
    file = shard_of(path, stored)
    rewrite(file, lambda t: t.pop(stored))
    index = path / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        del data["weight_map"][stored]
        index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing") as err:
        load_checkpoint(path)
    assert reported in str(err.value)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_unexpected_tensor(copy_of, kind):
    path = copy_of(kind)
    name = "model.layers.0.mlp.extra_proj.weight"
    if kind == "single":
        file = path / "model.safetensors"
        rewrite(file, lambda t: t.update({name: torch.zeros(4, 4)}))
    else:  # a file of its own, listed in the index
        file = path / "model-extra.safetensors"
        save_file({name: torch.zeros(4, 4)}, str(file))
        data = json.loads((path / INDEX_FILE).read_text())
        data["weight_map"][name] = file.name
        (path / INDEX_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unexpected") as err:
        load_checkpoint(path)
    assert name in str(err.value) and file.name in str(err.value)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_wrong_shape(copy_of, kind):
    path = copy_of(kind)
    name = "model.layers.2.linear_attn.in_proj_b.weight"  # (Hv, hidden) = (4, 64)
    file = shard_of(path, name)
    rewrite(file, lambda t: t.update({name: torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match="shape") as err:
        load_checkpoint(path)
    assert name in str(err.value) and file.name in str(err.value)


def test_wrong_shape_in_the_published_layout_names_the_stored_tensor(copy_of):
    path = copy_of("published")
    stored = "model.language_model.layers.2.linear_attn.in_proj_b.weight"
    file = shard_of(path, stored)
    rewrite(file, lambda t: t.update({stored: torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match="shape") as err:
        load_checkpoint(path)
    assert stored in str(err.value) and file.name in str(err.value)


def test_tied_checkpoint_that_also_stores_the_head_loads(copy_of):
    path = copy_of("single")
    rewrite(path / "model.safetensors", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_checkpoint(path).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- save -> load round trips -------------------------------------------------------------------------------------


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("source", ["single", "untied", "published"])
@pytest.mark.parametrize("shard", [None, SHARD_BYTES], ids=["one-file", "sharded"])
def test_save_load_round_trip(sources, tmp_path, source, shard):
    ckpt = load_checkpoint(sources[source])
    out = tmp_path / "saved"
    kwargs = {} if shard is None else {"max_shard_bytes": shard}
    save_checkpoint(ckpt.model, out, extra_tensors=ckpt.mtp, **kwargs)
    files = sorted(out.glob("*.safetensors"))
    if shard is None:
        assert [f.name for f in files] == ["model.safetensors"] and not (out / INDEX_FILE).exists()
    else:
        assert len(files) > 2
        weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
        assert set(weight_map.values()) == {f.name for f in files}
        for f in files:
            assert all(weight_map[n] == f.name for n in safe_open(f, framework="pt").keys())
    assert not list(out.glob(".*.tmp")), "temporary files left behind"

    again = load_checkpoint(out)
    assert_same_weights(again.model, ckpt.model)
    assert torch.equal(logits(again.model, IDS), logits(ckpt.model, IDS))
    assert again.mtp.keys() == ckpt.mtp.keys()
    assert all(torch.equal(again.mtp[n], ckpt.mtp[n]) for n in ckpt.mtp)
    assert (again.model.lm_head.weight is again.model.model.embed_tokens.weight) == (source != "untied")


@pytest.mark.parametrize("source", ["single", "untied", "published"])
@pytest.mark.parametrize("shard", [None, SHARD_BYTES], ids=["one-file", "sharded"])
def test_saved_checkpoint_loads_in_transformers(built, sources, tmp_path, source, shard):
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(sources[source])
    out = tmp_path / "saved"
    save_checkpoint(ckpt.model, out, extra_tensors=ckpt.mtp, **({} if shard is None else {"max_shard_bytes": shard}))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3_5ForCausalLM"
    hf_state = hf.state_dict()
    for name, tensor in ckpt.model.state_dict().items():
        assert torch.equal(hf_state[name], tensor), name
    # same weights, same implementation: the logits of the model that wrote the source checkpoint
    expected = reference_logits(built[source][1], IDS)
    assert max_abs_diff(reference_logits(hf, IDS), expected) <= 1e-5
    # and qwenlite's, within the fp32 parity tolerance of test_model.py (two implementations: ~2e-5 apart)
    assert max_abs_diff(reference_logits(hf, IDS), logits(ckpt.model, IDS)) <= 1e-4


def test_bfloat16_save_keeps_the_dtype(sources, tmp_path):
    ckpt = load_checkpoint(sources["single"], dtype="bfloat16")
    save_checkpoint(ckpt.model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again = load_checkpoint(tmp_path)  # dtype from config.json
    assert all(p.dtype == torch.bfloat16 for p in again.model.parameters())
    assert_same_weights(again.model, ckpt.model)


# --- memory mapping -----------------------------------------------------------------------------------------------
# A tensor is memory-mapped when its data pointer lies in an address range that /proc/self/maps says is mapped
# from one of the checkpoint's files. This reads the kernel's own record, so it does not depend on how safetensors
# or torch wrap the storage; a tensor that was copied or converted lives in anonymous memory and fails it.


def file_mappings(files) -> list[tuple[int, int, str]]:
    paths = {os.path.realpath(f) for f in files}
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in paths:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip()))
    return out


def mapped_file(tensor: torch.Tensor, mappings) -> str | None:
    ptr = tensor.data_ptr()
    end = ptr + tensor.numel() * tensor.element_size()
    return next((path for lo, hi, path in mappings if lo <= ptr and end <= hi), None)


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


@needs_proc
@pytest.mark.parametrize("kind", ["single", "published"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_matching_dtype_loads_memory_mapped(sources, kind, dtype):
    ckpt = load_checkpoint(sources[kind], dtype=dtype)
    mappings = file_mappings(sources[kind].glob("*.safetensors"))
    for name, p in [*ckpt.model.named_parameters(), *ckpt.mtp.items()]:
        assert p.dtype == torch.float32
        assert mapped_file(p, mappings) is not None, f"{name} was copied instead of memory-mapped"
    # and it lies in the file that holds it
    name = "model.layers.1.linear_attn.in_proj_qkv.weight"
    stored = name if kind == "single" else name.replace("model.", "model.language_model.", 1)
    holder = os.path.realpath(shard_of(sources[kind], stored))
    assert mapped_file(ckpt.model.get_parameter(name), mappings) == holder


@needs_proc
def test_converted_dtype_is_a_copy(sources):
    ckpt = load_checkpoint(sources["single"], dtype="bfloat16")
    mappings = file_mappings(sources["single"].glob("*.safetensors"))
    for name, p in ckpt.model.named_parameters():
        assert mapped_file(p, mappings) is None, name
