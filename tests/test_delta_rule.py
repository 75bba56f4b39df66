"""The chunked and step forms of the gated delta rule against the token-by-token fp32 reference.

Tolerance: fp32, 1e-5 absolute and relative on outputs and states of magnitude O(1) (the chunked form reorders
sums over up to CHUNK_SIZE (64) tokens; measured differences are ~1e-6)."""

import pytest
import torch
import torch.nn.functional as F

from qwenlite.ops.delta_rule import (
    CHUNK_SIZE,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
)

ATOL = RTOL = 1e-5
B, DK, DV = 2, 16, 32  # Dk != Dv, so that a transposed state cannot pass


def make_inputs(T: int, Hk: int, Hv: int, seed: int = 0, with_state: bool = False, dtype=torch.float32):
    """Inputs as the model produces them: q, k L2-normalised (q scaled by Dk^-0.5), beta in (0, 1) and log
    decays spanning value heads that never forget (g = 0), forget slowly, and forget within a few tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, Hk, DK, generator=gen), dim=-1) * DK**-0.5
    k = F.normalize(torch.randn(B, T, Hk, DK, generator=gen), dim=-1)
    v = torch.randn(B, T, Hv, DV, generator=gen)
    beta = torch.rand(B, T, Hv, generator=gen)
    rate = torch.logspace(-3, 1, Hv)  # per head: 1e-3 .. 10
    rate[0] = 0.0  # no decay at all
    g = -rate * F.softplus(torch.randn(B, T, Hv, generator=gen))
    state = torch.randn(B, Hv, DK, DV, generator=gen) if with_state else None
    return tuple(x.to(dtype) for x in (q, k, v, g, beta)) + (state,)


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


HEADS = [pytest.param(2, 2, id="Hv=Hk"), pytest.param(2, 4, id="Hv=2Hk")]
STATES = [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")]


@pytest.mark.parametrize("with_state", STATES)
@pytest.mark.parametrize("Hk,Hv", HEADS)
# Around the default chunk size, whatever it is: one token, a chunk but one, one chunk, a chunk and one, two but one.
@pytest.mark.parametrize("T", [1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE - 1])
def test_chunked_matches_recurrent(T, Hk, Hv, with_state):
    q, k, v, g, beta, state = make_inputs(T, Hk, Hv, seed=T, with_state=with_state)
    state_before = None if state is None else state.clone()
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, state)
    assert o.shape == (B, T, Hv, DV) and s.shape == (B, Hv, DK, DV)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    if state is not None:
        assert torch.equal(state, state_before), "the initial state must not be written"
    assert o_ref.abs().max() > 1e-2, "outputs too small for the tolerance to mean anything"


@pytest.mark.parametrize("with_state", STATES)
def test_chunked_matches_recurrent_long(with_state):
    q, k, v, g, beta, state = make_inputs(500, 2, 4, seed=500, with_state=with_state)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, state)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("chunk_size", [1, 16, 100])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v, g, beta, state = make_inputs(130, 2, 4, seed=1, with_state=True)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("with_state", STATES)
@pytest.mark.parametrize("Hk,Hv", HEADS)
@pytest.mark.parametrize("T", [1, CHUNK_SIZE + 1])
def test_step_token_by_token_matches_recurrent(T, Hk, Hv, with_state):
    q, k, v, g, beta, state = make_inputs(T, Hk, Hv, seed=10 + T, with_state=with_state)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    S = torch.zeros(B, Hv, DK, DV) if state is None else state.clone()
    outs = []
    for t in range(T):
        o, S_out = gated_delta_rule_step(*(x[:, t : t + 1] for x in (q, k, v, g, beta)), S)
        assert S_out is S, "the step form updates the state in place"
        assert o.shape == (B, 1, Hv, DV)
        outs.append(o)
    assert_close(torch.cat(outs, dim=1), o_ref)
    assert_close(S, s_ref)


def test_pieces_continue_from_the_state():
    """A prefill in pieces (chunked, chunked, step) equals one pass: the final state is the whole history."""
    q, k, v, g, beta, _ = make_inputs(150, 2, 4, seed=3)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta)
    cut = [0, 70, 149, 150]
    parts, S = [], None
    for a, b in zip(cut[:-2], cut[1:-1], strict=True):
        o, S = gated_delta_rule_chunked(*(x[:, a:b] for x in (q, k, v, g, beta)), S)
        parts.append(o)
    o, S = gated_delta_rule_step(*(x[:, 149:150] for x in (q, k, v, g, beta)), S.clone())
    parts.append(o)
    assert_close(torch.cat(parts, dim=1), o_ref)
    assert_close(S, s_ref)


def test_bfloat16_inputs_give_float32_outputs():
    q, k, v, g, beta, state = make_inputs(65, 2, 4, seed=4, with_state=True, dtype=torch.bfloat16)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, state)
    assert_close(o, o_ref)  # same bf16 inputs, computed in fp32 by both
    assert_close(s, s_ref)
    o1, s1 = gated_delta_rule_step(*(x[:, :1] for x in (q, k, v, g, beta)), state.clone())
    assert o1.dtype == s1.dtype == torch.float32


@pytest.mark.parametrize("Hk,Hv", HEADS)
def test_chunked_gradient_matches_recurrent(Hk, Hv):
    """Training runs the chunked form: its gradients wrt every input, state included, equal the reference's."""
    T = CHUNK_SIZE + 6  # two chunks, the second partial
    inputs = [x.requires_grad_() for x in make_inputs(T, Hk, Hv, seed=6, with_state=True)]
    gen = torch.Generator().manual_seed(7)
    w_o, w_s = torch.randn(B, T, Hv, DV, generator=gen), torch.randn(B, Hv, DK, DV, generator=gen)

    def grads(fn):
        o, s = fn(*inputs)
        return torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)

    expected = grads(gated_delta_rule_recurrent)
    got = grads(gated_delta_rule_chunked)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "state"], got, expected, strict=True):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d/d{name}: {m}")
