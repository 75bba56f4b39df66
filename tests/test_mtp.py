"""The MTP head (model/mtp.py) against a slow fp32 computation of its formula written out here (transformers does not
implement the head), and its loading: the published layout's `mtp.*` tensors, strictly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlite import speculative
from qwenlite.errors import CheckpointError
from qwenlite.io.checkpoint import assemble_mtp
from qwenlite.io.load import load_model, load_mtp
from qwenlite.model import runner
from qwenlite.model.cache import make_cache
from qwenlite.model.quantized import quantize_like, quantize_model
from qwenlite.speculative import MTPDraft

from helpers import TINY_TEXT_CONFIG, make_hf_checkpoint, make_mtp_tensors, random_ids

TOL = 1e-4  # fp32 against fp32, the same formula computed in another order


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm: x_hat * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Partial rotary, half-split layout, on the first `rotary_dim` dims of x (T, H, D)."""
    inv = theta ** -(torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    angle = positions.double()[:, None] * inv  # (T, R/2)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    x1, x2, rest = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def slow_mtp_logits(t: dict, embed: torch.Tensor, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The head from its formula, one sequence, no cache: next_ids (T,), hidden (T, H) -> logits (T, V)."""
    c = TINY_TEXT_CONFIG
    nh, nkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = "mtp.layers.0."
    T = next_ids.shape[0]
    e = rms(embed[next_ids], t["mtp.pre_fc_norm_embedding.weight"])
    x = torch.cat([e, rms(hidden, t["mtp.pre_fc_norm_hidden.weight"])], -1) @ t["mtp.fc.weight"].T
    h = rms(x, t[p + "input_layernorm.weight"])
    qg = (h @ t[p + "self_attn.q_proj.weight"].T).view(T, nh, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    k = (h @ t[p + "self_attn.k_proj.weight"].T).view(T, nkv, D)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).view(T, nkv, D)
    q, k = rms(q, t[p + "self_attn.q_norm.weight"]), rms(k, t[p + "self_attn.k_norm.weight"])
    pos = torch.arange(T)
    rope = c["rope_parameters"]
    rd = int(D * rope["partial_rotary_factor"])
    q, k = rotate(q, pos, rd, rope["rope_theta"]), rotate(k, pos, rd, rope["rope_theta"])
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v) * torch.sigmoid(gate)
    x = x + o.reshape(T, nh * D) @ t[p + "self_attn.o_proj.weight"].T
    m = rms(x, t[p + "post_attention_layernorm.weight"])
    up = F.silu(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T)
    x = x + up @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["mtp.norm.weight"]) @ embed.T


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny checkpoint in the published layout with a random MTP head, loaded in fp32."""
    path = tmp_path_factory.mktemp("published")
    make_hf_checkpoint(path, layout="conditional_generation", add_mtp=True)
    model, _ = load_model(path, "float32", with_tokenizer=False)
    return path, model, load_mtp(path, model)


@torch.no_grad()
def test_head_logits_match_the_formula_at_once_and_token_by_token(published):
    _, model, head = published
    ids = random_ids(1, 12, seed=5)
    hidden = model.model(ids)  # (1, T, H): the final hidden states, normed
    next_ids = random_ids(1, 12, seed=6)  # any tokens t+1: the head does not care where they come from
    want = slow_mtp_logits(make_mtp_tensors(), model.model.embed_tokens.weight, next_ids[0], hidden[0])
    cache = make_cache(model.config, max_seq_len=16, dtype=torch.float32, layer_types=["full_attention"])
    whole = model.lm_head(head(model, next_ids, hidden, cache))[0]
    assert (whole - want).abs().max() < TOL
    cache = make_cache(model.config, max_seq_len=16, dtype=torch.float32, layer_types=["full_attention"])
    steps = [model.lm_head(head(model, next_ids[:, i : i + 1], hidden[:, i : i + 1], cache))[0, 0] for i in range(12)]
    assert (torch.stack(steps) - want).abs().max() < TOL
    assert int(cache.lengths[0]) == 12


@torch.inference_mode()
def test_the_drafts_step_in_one_call_matches_the_formula(published, monkeypatch):
    """MTPDraft.step, the head's layer, norm and the model's head in one C call (model/runner.head_step_in_one_call):
    a first call over 5 positions then single ones, the last position's logits each time, as the formula's."""
    _, model, head = published
    next_ids = random_ids(1, 9, seed=6)
    hidden = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(5))  # any states
    want = slow_mtp_logits(make_mtp_tensors(), model.model.embed_tokens.weight, next_ids[0], hidden[0])
    ran, step = [], runner.head_step_in_one_call
    monkeypatch.setattr(runner, "head_step_in_one_call", lambda *a: ran.append(a[2].shape[1]) or step(*a))
    monkeypatch.setattr(speculative, "head_step_in_one_call", runner.head_step_in_one_call)
    draft = MTPDraft(model, head)
    draft.begin(16)
    got = [draft.step(next_ids[:, :5], hidden[:, :5])[1][0, -1]]
    got += [draft.step(next_ids[:, i : i + 1], hidden[:, i : i + 1])[1][0, -1] for i in range(5, 9)]
    assert (torch.stack(got) - want[4:]).abs().max() < TOL
    assert int(draft.cache.lengths[0]) == 9
    assert ran == [5, 1, 1, 1, 1] and head.__dict__["_decode_plan"].model is not None  # each step ran in C


@pytest.mark.parametrize(("dtype", "bits"), [("float32", None), ("bfloat16", None), ("bfloat16", 8), ("float32", 4)])
def test_greedy_drafts_in_one_call_are_the_step_by_step_drafts(published, dtype, bits, monkeypatch):
    """MTPDraft.propose handed speculative.greedy_pick drafts all k tokens in one C call (kernels.draft_greedy: the
    head over the positions the model ran, then over each draft, each the argmax of the last logits, each draft's
    embedding looked up in C, from a quantized table too); any other pick (here the same argmax, wrapped) drafts step
    by step: the same tokens, and the head's cache at the same length."""
    path, _, _ = published
    model, _ = load_model(path, dtype, with_tokenizer=False)
    head = load_mtp(path, model)
    if bits:
        quantize_like(head, quantize_model(model, bits, 32))
    in_one_call, real = [], speculative.head_drafts_in_one_call

    def spy(*args):
        in_one_call.append(real(*args))
        return in_one_call[-1]

    monkeypatch.setattr(speculative, "head_drafts_in_one_call", spy)
    tokens = random_ids(1, 12, seed=3)[0].tolist()
    with torch.inference_mode():
        hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(model.dtype)
        proposed = []
        for pick in (speculative.greedy_pick, lambda logits, drafted: speculative.greedy_pick(logits, drafted)):
            draft = MTPDraft(model, head)
            draft.begin(32)
            proposed.append((draft.propose(tokens, hidden, 5, pick), draft.cache.lengths.tolist()))
    assert proposed[0] == proposed[1]
    assert proposed[0][1] == [len(tokens) - 1 - 4 + 4 + 5 - 1]
    assert len(in_one_call) == 1 and in_one_call[0] is not None  # the first pick's drafts ran in C


def test_load_finds_the_head_and_none_without_one(published, tmp_path):
    path, model, head = published
    assert head is not None and head.fc.weight.dtype == torch.float32
    assert torch.equal(head.fc.weight, make_mtp_tensors()["mtp.fc.weight"])
    make_hf_checkpoint(tmp_path)
    plain, _ = load_model(tmp_path, "float32", with_tokenizer=False)
    assert load_mtp(tmp_path, plain) is None


def test_load_is_strict(published):
    _, model, _ = published
    tensors = make_mtp_tensors()
    with pytest.raises(CheckpointError, match="missing tensor mtp.norm.weight"):
        assemble_mtp(model.config, {k: v for k, v in tensors.items() if k != "mtp.norm.weight"}, torch.float32)
    extra = tensors | {"mtp.layers.1.mlp.up_proj.weight": tensors["mtp.layers.0.mlp.up_proj.weight"]}
    with pytest.raises(CheckpointError, match="unexpected MTP tensor mtp.layers.1.mlp.up_proj.weight"):
        assemble_mtp(model.config, extra, torch.float32)
    wrong = tensors | {"mtp.fc.weight": tensors["mtp.fc.weight"][:, :10]}
    with pytest.raises(CheckpointError, match="mtp.fc.weight has shape"):
        assemble_mtp(model.config, wrong, torch.float32)
