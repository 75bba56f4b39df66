"""The gated delta rule of Gated DeltaNet, three ways with one signature.

Per value head the fp32 state S (Dk x Dv) evolves token by token as

    S = exp(g) * S;   d = beta * (v - S^T k);   S = S + k d^T;   o = S^T q

`gated_delta_rule_recurrent` is that loop, the spec. `gated_delta_rule_chunked` is the same recurrence
in the chunked (WY / UT-transform) form, for prefill and training. `gated_delta_rule_step` is one token of
the loop updating the state in place, for decode.

Inputs: q, k (B, T, Hk, Dk) already L2-normalised (q also scaled by Dk^-0.5); v (B, T, Hv, Dv);
g (log decay, <= 0) and beta (B, T, Hv); state (B, Hv, Dk, Dv) fp32 or None. Value head h reads key head
h // (Hv / Hk). Outputs: o (B, T, Hv, Dv) fp32 and the final state (B, Hv, Dk, Dv) fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def _expand_heads(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rep = num_v_heads // q.shape[2]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    return q, k


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token fp32 reference: the definition the other forms are tested against."""
    B, T, Hv, Dv = v.shape
    q, k = _expand_heads(q, k, Hv)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, Hv, q.shape[-1], Dv) if state is None else state.float().clone()
    out = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        kv_mem = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        d = beta[:, t, :, None] * (v[:, t] - kv_mem)  # (B, Hv, Dv)
        S = S + k[:, t, :, :, None] * d[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(out, dim=1), S


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token (T == 1); `state` is updated in place and returned."""
    Hv = v.shape[2]
    q, k = _expand_heads(q, k, Hv)
    q, k, v = q[:, 0].float(), k[:, 0].float(), v[:, 0].float()  # (B, H, D)
    state.mul_(g[:, 0, :, None, None].float().exp())
    kv_mem = torch.einsum("bhkv,bhk->bhv", state, k)
    d = beta[:, 0, :, None].float() * (v - kv_mem)  # (B, Hv, Dv)
    state.add_(k.unsqueeze(-1) * d.unsqueeze(-2))
    o = torch.einsum("bhkv,bhk->bhv", state, q)
    return o.unsqueeze(1), state


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form: within a chunk the T updates collapse into triangular solves and matmuls, so the
    sequential loop runs T / chunk_size times. Differentiable; no in-place writes on autograd tensors."""
    B, T, Hv, Dv = v.shape
    q, k = _expand_heads(q, k, Hv)
    Dk = q.shape[-1]
    # (B, H, T, D) fp32, padded to a multiple of the chunk size; padded steps have g = 0, beta = 0: no-ops.
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    g, beta = (x.transpose(1, 2).float() for x in (g, beta))
    pad = (-T) % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk_size
    C = chunk_size
    q, k, v = (x.reshape(B, Hv, n, C, -1) for x in (q, k, v))
    g, beta = g.reshape(B, Hv, n, C), beta.reshape(B, Hv, n, C)

    G = g.cumsum(-1)  # (B, H, n, C) log decay from chunk start to each position
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(G_i - G_j) for j <= i, else 0
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    # (I + A) W = [k_beta * exp(G), v * beta] with A strictly lower: the UT transform of the delta updates.
    A = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([k_beta * G.exp().unsqueeze(-1), v * beta.unsqueeze(-1)], dim=-1)
    # Invert the unit-triangular (C, C) system once, then one matmul: cheaper than solving for 2 * D columns.
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    W = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True) @ rhs  # diagonal read as 1
    w_k, u = W[..., :Dk], W[..., Dk:]  # (B, H, n, C, Dk), (B, H, n, C, Dv)
    qk = (q @ k.transpose(-1, -2)) * decay  # intra-chunk attention, causal incl. diagonal
    q_decayed = q * G.exp().unsqueeze(-1)
    k_tail = k * (G[..., -1:] - G).exp().unsqueeze(-1)  # decay from each position to chunk end
    chunk_decay = G[..., -1].exp()  # (B, H, n)

    S = q.new_zeros(B, Hv, Dk, Dv) if state is None else state.float()
    out = []
    for c in range(n):
        v_new = u[:, :, c] - w_k[:, :, c] @ S  # what the old state does not already predict
        out.append(q_decayed[:, :, c] @ S + qk[:, :, c] @ v_new)
        S = S * chunk_decay[:, :, c, None, None] + k_tail[:, :, c].transpose(-1, -2) @ v_new
    o = torch.cat(out, dim=2)[:, :, :T]  # (B, H, T, Dv)
    return o.transpose(1, 2).contiguous(), S
