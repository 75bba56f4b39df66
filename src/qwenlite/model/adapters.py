"""Many LoRA adapters on one model, chosen per row: the module swap that serving several fine-tunes of one base
in one batch needs (S-LoRA / Punica's idea, here in plain torch).

`attach_adapters(model, adapters)` replaces each Linear (or QuantLinear) that any adapter targets by an
`AdapterLinear`, which keeps the layer as `base_layer` and holds every adapter's A and B (scaled) for it, stacked
(index 0 is the base: zeros). All of a model's AdapterLinears share one `AdapterSelection`: before each forward
the caller says which adapter each row uses (`select([0, 2, 1])`, 0 = the base); then each layer adds, for each
adapter present in the batch, `(x_rows A^T) B^T * scaling` to that adapter's rows only: one small matmul pair
per adapter and layer, base rows untouched. The delta is computed in fp32 whatever the base's dtype, as
train/lora.py's LoRALinear computes it, so a row's output is that adapter's model's.

The whole-model decode step in C (model/runner.py) knows no adapters: it is taken only while every row is on the
base (over the base layers), any other step is the forward. Reading PEFT files and checking them against the base
is io/adapters.py's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenlite.errors import CheckpointError
from qwenlite.model.quantized import QuantLinear


@dataclass
class Adapter:
    """One LoRA adapter's weights by module path of the flat model (`model.layers.0.self_attn.q_proj`):
    A (r, in) and B (out, r), fp32; the layer adds (x A^T) B^T * scaling. `vocabulary`: tensors of the file that
    replace or adapt the embedding or the head (by their key), which io/adapters.check_adapter refuses; `dropout`
    is training's (train/lora.py), inference has none."""

    name: str
    r: int
    alpha: float
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    vocabulary: dict[str, torch.Tensor] = field(default_factory=dict)
    dropout: float = 0.0


class AdapterSelection:
    """Which adapter each row of the next forwards uses (0 = the base), shared by a model's AdapterLinears. Rows
    are the forward's batch rows; a layer that sees its input flattened to (B * T, in) maps token m to row m // T.
    Set by one thread (the one that runs the model) before each forward; nothing selected = the base."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)  # index i + 1 is adapter names[i]
        self.rows: tuple[int, ...] = ()
        self._groups: dict[tuple, list[tuple[int, torch.Tensor | None]]] = {}

    def select(self, rows: Sequence[int]) -> None:
        rows = tuple(int(r) for r in rows)
        bad = [r for r in rows if not 0 <= r <= len(self.names)]
        if bad:
            raise ValueError(f"adapter index {bad[0]} out of range: {len(self.names)} adapters are attached")
        if rows != self.rows:
            self.rows, self._groups = rows, {}

    @contextmanager
    def selected(self, rows: Sequence[int]) -> Iterator[None]:
        previous = self.rows
        self.select(rows)
        try:
            yield
        finally:
            self.select(previous)

    def groups(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """For a layer's input x (B, T, in) or (B * T, in): (adapter, token indices into x's rows flattened, or None
        for all) per adapter in use, base left out; computed once per selection and shape, not per layer."""
        M = x.numel() // x.shape[-1]
        batch = x.shape[0] if x.dim() > 2 else None  # flattened: M = B * T
        if (M, batch, x.device) not in self._groups:
            B = len(self.rows)
            if B == 0 or not any(self.rows):
                found: list[tuple[int, torch.Tensor | None]] = []
            elif M % B or batch not in (None, B):
                raise ValueError(f"adapters were selected for {B} rows, but a layer sees {tuple(x.shape[:-1])}")
            elif len(set(self.rows)) == 1:
                found = [(self.rows[0], None)]
            else:
                T = M // B
                tokens = torch.arange(M, device=x.device).view(B, T)
                found = [(a, tokens[[b for b, r in enumerate(self.rows) if r == a]].flatten())
                         for a in sorted(set(self.rows) - {0})]  # fmt: skip
            self._groups[M, batch, x.device] = found
        return self._groups[M, batch, x.device]


class AdapterLinear(nn.Module):
    """y = base_layer(x), plus for each row whose adapter a > 0 targets this layer: (x A_a^T) (scaling_a B_a^T),
    the S-LoRA / Punica shrink and expand: `shrink` (n + 1, in, r) holds each A^T, `expand` (n + 1, r, out) each
    scaling * B^T (transposed and scaled once here: a strided B^T costs a decode step's matmul ~4x), fp32,
    zero-padded to the largest rank (zero columns and rows add nothing); index 0 is the base."""

    def __init__(self, base_layer: nn.Linear | QuantLinear, selection: AdapterSelection, r: int):
        super().__init__()
        self.base_layer = base_layer
        self.selection = selection
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        n = len(selection.names) + 1
        device = base_layer.qweight.device if isinstance(base_layer, QuantLinear) else base_layer.weight.device
        self.register_buffer("shrink", torch.zeros(n, self.in_features, r, device=device))
        self.register_buffer("expand", torch.zeros(n, r, self.out_features, device=device))
        self.targeted = [False] * n  # which adapters have weights here

    @torch.no_grad()
    def set_adapter(self, index: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        r = A.shape[0]
        self.shrink[index].zero_()
        self.expand[index].zero_()
        self.shrink[index, :, :r] = A.T
        self.expand[index, :r] = B.T * scaling
        self.targeted[index] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        groups = [(a, idx) for a, idx in self.selection.groups(x) if self.targeted[a]]
        if not groups:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        for a, idx in groups:
            xa = (x2 if idx is None else x2.index_select(0, idx)).float()  # (m, in)
            delta = (xa @ self.shrink[a] @ self.expand[a]).to(y.dtype)  # (m, out)
            if idx is None:
                y2 = y2 + delta
            else:
                y2 = y2.index_add(0, idx, delta)
        return y2.reshape(y.shape)

    def extra_repr(self) -> str:
        names = [n for i, n in enumerate(self.selection.names, 1) if self.targeted[i]]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={names}"


def attach_adapters(model: nn.Module, adapters: Sequence[Adapter]) -> AdapterSelection:
    """Swap every layer some adapter targets for an AdapterLinear holding all of them (adapter i is index i + 1).
    The adapters must already fit the model (io/adapters.check_adapter says so); routed experts of a mixture of
    experts are refused, their tokens arriving regrouped by expert rather than by row."""
    if adapter_selection(model) is not None:
        raise CheckpointError("this model already carries adapters")
    for adapter in adapters:
        routed = [p for p in adapter.weights if ".mlp.experts." in p]
        if routed:
            raise CheckpointError(f"adapter {adapter.name}: {routed[0]} is a routed expert, which per-row adapters "
                                  "do not support")  # fmt: skip
    selection = AdapterSelection([a.name for a in adapters])
    layers: dict[str, AdapterLinear] = {}
    for path in sorted({p for a in adapters for p in a.weights}):
        r = max(a.weights[path][0].shape[0] for a in adapters if path in a.weights)
        parent, _, name = path.rpartition(".")
        owner_module = model.get_submodule(parent)
        layers[path] = AdapterLinear(getattr(owner_module, name), selection, r)
        setattr(owner_module, name, layers[path])
    for i, adapter in enumerate(adapters, 1):
        for path, (A, B) in adapter.weights.items():
            layers[path].set_adapter(i, A, B, adapter.scaling)
    return selection


def adapter_selection(model: nn.Module) -> AdapterSelection | None:
    """The selection a model's adapters share, or None for a model without adapters."""
    return next((m.selection for m in model.modules() if isinstance(m, AdapterLinear)), None)
