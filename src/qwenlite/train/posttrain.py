"""What SFT and DPO share besides their loop (`common.run_steps`) and its settings (`common.TrainSettings`): reading
JSONL with errors that name the line, per-token log-probabilities of a right-padded batch, loading the model to train
and writing the result.

What differs, one optimizer step's micro-batches, lives in `sft.py` and `dpo.py`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import Checkpoint, checkpoint_files, copy_side_files, load_checkpoint, save_checkpoint
from qwenlite.io.files import atomic_write
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.vision import ImageInput, VideoInput, embed_prompt
from qwenlite.text.tokenizer import ENDOFTEXT, IM_END, Tokenizer
from qwenlite.train.common import TrainSettings
from qwenlite.train.lora import DEFAULT_TARGETS, apply_lora, merge_lora, save_adapter
from qwenlite.train.moe import aux_loss_enabled, load_balancing_loss, padding_mask, recording_router_logits

IGNORE = -100  # label of a token that is context, not target


@dataclass
class LoRASettings:
    r: int
    alpha: float | None = None  # default 2r
    dropout: float = 0.0
    targets: Sequence[str] = DEFAULT_TARGETS
    merge: bool = False  # also write the merged model to OUT/merged


def epoch_order(n: int, total_needed: int, seed: int) -> Iterator[int]:
    """Example indices, reshuffled each epoch, for as many as the run needs."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < total_needed:
        for i in torch.randperm(n, generator=generator).tolist():
            if produced == total_needed:
                return
            produced += 1
            yield i


# ---------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise QwenliteError(f"no such data file: {path}")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QwenliteError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise QwenliteError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def pad_batch(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) pairs -> right-padded (B, T) tensors. Right padding is exact without a mask: every layer is
    causal, so pads after a sequence never reach its tokens."""
    T = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE, dtype=torch.long)
    for b, (i, lab) in enumerate(sequences):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
    return ids, labels


def pad_token_id(tokenizer: Tokenizer) -> int:
    # Pads are never seen by real tokens (right padding) nor trained; any valid id would do.
    for token in (ENDOFTEXT, IM_END):
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return 0


def token_logprobs(
    model: Qwen3_5ForCausalLM, ids: torch.Tensor, labels: torch.Tensor, images: Sequence[ImageInput | VideoInput] = ()
) -> torch.Tensor:
    """log p(labels[b, t] | ids[b, :t]) at every labelled position, 0 elsewhere: (B, T-1) fp32. `images` (images and
    videos) fill the `<|image_pad|>` / `<|video_pad|>` runs of a single row (B = 1), their features and rotary
    positions as inference takes them."""
    return forward_logprobs(model, ids, labels, images)[0]


def forward_logprobs(
    model: Qwen3_5ForCausalLM,
    ids: torch.Tensor,
    labels: torch.Tensor,
    images: Sequence[ImageInput | VideoInput] = (),
    lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs`, and the router's load-balancing loss of the same forward (train/moe.py) over the rows' real
    tokens (`lengths`: each row's before its padding; None: all), or None unless the model is a MoE whose config
    asks for it. The model sees every token of ids, as transformers' forward with labels does (the last one
    predicts nothing but is routed).

    The head runs only on the labelled positions: on a 248K vocabulary, full logits of a long batch would be
    the largest tensor of the step."""
    device = model.model.embed_tokens.weight.device
    ids, labels = ids.to(device), labels.to(device)
    aux = aux_loss_enabled(model.config)
    with recording_router_logits(model) if aux else contextlib.nullcontext() as router_logits:
        if images:
            # A frozen tower builds no graph: neither its weights nor the pixels require grad.
            embeds, positions, _ = embed_prompt(model, ids[0].tolist(), images)
            hidden = model.model(ids, embeds=embeds, positions=positions)
        else:
            hidden = model.model(ids)  # (B, T, H), position t predicts token t+1
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][mask]).float()  # (N, V)
    picked = -F.cross_entropy(logits, targets[mask], reduction="none")
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    out = out.masked_scatter(mask, picked)
    if not aux:
        return out, None
    real = None if lengths is None else padding_mask(lengths, ids.shape[1])
    return out, load_balancing_loss(router_logits, model.config.num_experts_per_tok, real)


# ---------------------------------------------------------------------------------------------
# Model in, result out


def load_for_training(
    model_path: Path, s: TrainSettings, lora: LoRASettings | None, train_vision: bool = False
) -> Checkpoint:
    """The checkpoint with its vision tower, if it has one (saved with the result), frozen unless `train_vision`;
    with `lora`, adapters on the language model's layers only (the adapter names no tower layer)."""
    ckpt = load_checkpoint(model_path, dtype=s.dtype, device=s.device, vision=True)
    model = ckpt.model
    if lora is not None:
        paths = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, seed=s.seed)
        if tower := [p for p in paths if p.startswith("visual.")]:
            raise QwenliteError(
                f"the LoRA targets match {tower[0]}, a layer of the vision tower; adapters adapt the language model "
                "only (--train-vision trains the tower, without --lora)"
            )
    if model.visual is not None:
        model.visual.requires_grad_(train_vision)
    model.train()
    return ckpt


def is_language_model_layout(checkpoint_dir: Path) -> bool:
    """True for the published Qwen3_5ForConditionalGeneration layout (text model under model.language_model)."""
    return any(name.startswith("model.language_model.") for name in checkpoint_files(checkpoint_dir))


def save_result(ckpt: Checkpoint, out_dir: Path, lora: LoRASettings | None, history: list[dict]) -> None:
    """Full fine-tuning: a Hugging Face checkpoint in OUT, in the source checkpoint's dtype. LoRA: the PEFT adapter
    in OUT (and with `merge`, the merged checkpoint in OUT/merged). Every file is written atomically."""
    model = ckpt.model
    model.eval()
    if lora is None:
        save_model(ckpt, out_dir)
    else:
        save_adapter(model, out_dir, str(ckpt.path), is_language_model_layout(ckpt.path))
        copy_side_files(ckpt.path, out_dir)
        if lora.merge:
            merge_lora(model)
            save_model(ckpt, out_dir / "merged")
    log = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(out_dir / "train_log.jsonl", lambda p: p.write_text(log))


def save_model(ckpt: Checkpoint, out: Path, mtp: Mapping[str, torch.Tensor] | None = None) -> None:
    """The model as a checkpoint in `out`, in the source checkpoint's dtype, with its side files: the vision tower
    kept where the model has one (loaded by `load_for_training`; saved in the published multimodal layout), and `mtp`
    as the multi-token-prediction head (`mtp.*` tensors), by default the checkpoint's own."""
    model = ckpt.model.to(device="cpu", dtype=ckpt.config.torch_dtype)
    # Left unchanged by fine-tuning, the head rides along: a stale draft head only costs acceptance rate.
    save_checkpoint(model, out, extra_tensors=ckpt.mtp if mtp is None else mtp)
    copy_side_files(ckpt.path, out)


def log_line(record: dict, stream=sys.stderr) -> None:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()]
    print("  ".join(parts), file=stream, flush=True)
