"""The multi-token-prediction head every Qwen3.5 checkpoint ships (`mtp.*`): from the main model's final hidden
state h_t and the embedding of token t+1 it predicts token t+2, and chained it drafts several tokens ahead:

    x = fc(concat[pre_fc_norm_embedding(embed(token_{t+1})), pre_fc_norm_hidden(h_t)])
    x = layers[0](x)   one full-attention decoder layer (Qwen3.5's DecoderLayer), with its own KV cache
    logits = lm_head(norm(x))   embedding and head shared with the main model

h_t is the main model's output after its final norm (TextModel.forward's), as vLLM's Qwen3.5 MTP and llama.cpp
(#24025, which measured a higher acceptance than with the pre-norm state) feed it; norm(x) is what the next
chained step takes as its h. The head's token at row t sits at position t (rotary is relative, so only the
spacing matters). transformers does not implement the head (its Qwen3.5 MTP PR #45638 was closed): the tests
check it against a slow fp32 computation of the formula above.

Attribute paths are the checkpoint's names without the `mtp.` prefix (`fc.weight`, `layers.0.self_attn.q_proj.
weight`, ...); the embedding, head and rotary frequencies are the main model's, passed in, never owned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qwenlite.config import ModelConfig
from qwenlite.model.qwen3_5 import DecoderLayer, Linear, Qwen3_5ForCausalLM, RMSNorm

if TYPE_CHECKING:
    from qwenlite.model.cache import Cache

PREFIX = "mtp."


class MTP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        H, eps = c.hidden_size, c.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(H, eps, c.zero_centred_norms)
        self.pre_fc_norm_hidden = RMSNorm(H, eps, c.zero_centred_norms)
        self.fc = Linear(2 * H, H, bias=False)
        # One layer, as every published checkpoint; a checkpoint with more is refused by strict loading.
        self.layers = nn.ModuleList([DecoderLayer(c, "full_attention")])
        self.norm = RMSNorm(H, eps, c.zero_centred_norms)

    def forward(
        self, model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, hidden: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """input_ids (B, T): tokens t+1; hidden (B, T, H): the main model's final hidden states at t (or this head's
        own output, chained) -> this head's normed output (B, T, H); `model.lm_head` of it are the logits of t+2.
        `cache` (one attention layer: `make_cache(..., layer_types=["full_attention"])`) advances by T; None: a
        whole sequence at once (training, train/mtp.py)."""
        return self.run_layers(model, self.fuse(model, input_ids, hidden), cache)

    def fuse(self, model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """fc(concat[norm(embed(input_ids)), norm(hidden))]) (B, T, H): the layer's input."""
        e = self.pre_fc_norm_embedding(model.model.embed_tokens(input_ids))
        return self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden).to(e.dtype)], dim=-1))

    def run_layers(self, model: Qwen3_5ForCausalLM, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """The decoder layer and the norm over fuse's x (B, T, H); model/runner.head_step_in_one_call is its one C
        call (with the model's head)."""
        cos, sin, start = model.model.rotary(x.shape[1], cache, x.dtype, x.device)
        x = self.layers[0](x, cos, sin, cache.layers[0] if cache is not None else None, start)
        if cache is not None:
            cache.lengths += x.shape[1]
        return self.norm(x)
