"""`qwenlite train mtp`: fit a model's multi-token-prediction head (model/mtp.py) to the model as it is now, by
self-distillation.

Fine-tuning (SFT, LoRA, DPO) changes the model under a head that was trained for the original: its drafts still
come, but fewer are accepted. What speculative decoding accepts is the model's own next-token choice, so the head's
target is the model itself: at each position t of a training sequence the head, fed the model's final hidden state
at t and token t+1, is trained to give the distribution the model gives for token t+2 (KL(model || head), the
model frozen; its logits are computed once per batch without gradients). No labels are needed, only contexts like
those the model will answer in: the conversations of an SFT file (the assistant turns' positions, as SFT trains
them), or, with `generate`, the model's own answers to their prompts, which is exactly the text it drafts at
decode time.

The head starts from the checkpoint's (`init="checkpoint"`, when it has one) or from the documented
initialisation, and the whole checkpoint is written again with the new `mtp.*` tensors, atomically, so that
`qwenlite run OUT --speculate K` uses it; a vision tower is loaded and written as SFT does (posttrain.py), unchanged,
so the result still reads images and videos. The head is fitted on text: rows with images or videos are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlite.config import load_config
from qwenlite.errors import InvalidArgument
from qwenlite.generate import generate_tokens
from qwenlite.io.load import load_mtp
from qwenlite.model.mtp import MTP, PREFIX
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.common import FINE_TUNING_BETAS, Logger, TrainSettings, make_optimizer, run_steps
from qwenlite.train.posttrain import (
    IGNORE,
    epoch_order,
    load_for_training,
    log_line,
    pad_batch,
    pad_token_id,
    save_model,
)
from qwenlite.train.sft import load_sft_data


def new_head(model: Qwen3_5ForCausalLM, seed: int) -> MTP:
    """An MTP head for `model` with the documented initialisation (the names are the checkpoint's, sans `mtp.`)."""
    head = MTP(model.config).to(device=model.device, dtype=model.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in head.state_dict().items():
            tensor.copy_(initial_value(name, tuple(tensor.shape), generator, model.config.zero_centred_norms))
    return head


def distillation_loss(
    model: Qwen3_5ForCausalLM, head: MTP, ids: torch.Tensor, trained: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """ids (B, T), trained (B, T) bool: the positions whose token the head should draft. -> (mean KL(model || head)
    over the head's predictions of those tokens, {"agreement": how often the head's top token is the model's})."""
    with torch.no_grad():
        hidden = model.model(ids)  # (B, T, H), after the final norm, as drafting feeds it
        target = F.log_softmax(model.lm_head(hidden[:, 1:]).float(), dim=-1)  # (B, T-1, V): the model's token t+2
    # The head at t sees hidden t and token t+1 and predicts token t+2: the model's prediction at t+1.
    drafted = F.log_softmax(model.lm_head(head(model, ids[:, 1:], hidden[:, :-1])).float(), dim=-1)  # (B, T-1, V)
    mask = trained[:, 2:]  # token t+2 is one to draft
    target, drafted = target[:, :-1][mask], drafted[:, :-1][mask]  # the last position has no t+2
    if not len(target):
        raise InvalidArgument("no position to distil: every training sequence is shorter than 3 tokens")
    loss = F.kl_div(drafted, target, log_target=True, reduction="batchmean")
    agreement = (drafted.argmax(-1) == target.argmax(-1)).float().mean().item()
    return loss, {"agreement": agreement}


def fit_head(
    model: Qwen3_5ForCausalLM,
    head: MTP,
    sequences: Sequence[tuple[list[int], list[bool]]],
    settings: TrainSettings,
    pad_id: int,
    log: Logger = log_line,
) -> list[dict]:
    """Train `head` (in place) on (ids, trained) sequences against the frozen `model`. -> the log records."""
    model.eval().requires_grad_(False)
    head.train().requires_grad_(True)
    optimizer = make_optimizer(head, settings.lr, settings.weight_decay, FINE_TUNING_BETAS)
    total_steps = settings.total_steps(len(sequences))
    order = epoch_order(len(sequences), total_steps * settings.batch_size * settings.grad_accum, settings.seed)

    def train_step() -> tuple[dict, int]:  # one optimizer step's micro-batches; the loop is common.run_steps
        kl = agreement = 0.0
        tokens = 0
        for _ in range(settings.grad_accum):
            batch = [sequences[next(order)] for _ in range(settings.batch_size)]
            ids, flags = pad_batch([(ids, [int(f) for f in trained]) for ids, trained in batch], pad_id)
            loss, fields = distillation_loss(model, head, ids.to(model.device), flags.to(model.device) == 1)
            (loss / settings.grad_accum).backward()
            kl += loss.item() / settings.grad_accum
            agreement += fields["agreement"] / settings.grad_accum
            tokens += int(ids.numel())
        return {"kl": kl, "agreement": agreement}, tokens

    history = run_steps(head, optimizer, settings, total_steps, train_step, log)
    head.eval().requires_grad_(False)
    return history


def own_answers(model: Qwen3_5ForCausalLM, sequences, max_tokens: int, eos: Sequence[int]) -> list:
    """Each sequence cut before its first trained token, then continued by the model (greedy, at most
    `max_tokens`): the text the head will draft at decode time, every generated token trained."""
    out = []
    for ids, trained in sequences:
        cut = trained.index(True) if True in trained else len(ids)
        prompt = ids[:cut]
        answer = list(generate_tokens(model, prompt, SamplingParams(temperature=0), max_tokens, stop_ids=set(eos)))
        out.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return out


def train_mtp(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    init: str = "checkpoint",
    generate: int = 0,
    log: Logger = log_line,
) -> list[dict]:
    """Fit the MTP head of the checkpoint at `model_path` to it on the conversations of `data_path` (SFT's JSONL);
    write the checkpoint with the new head to `out_dir`. `init`: "checkpoint" (its head, when it has one) or
    "random". `generate` > 0: train on the model's own greedy answers (at most that many tokens) to the
    conversations' prompts instead of their assistant turns."""
    if init not in ("checkpoint", "random"):
        raise InvalidArgument(f"init must be 'checkpoint' or 'random', got {init!r}")
    model_path, settings = Path(model_path), settings or TrainSettings(lr=1e-3)
    config = load_config(model_path)
    if config.dense:
        raise InvalidArgument(
            f"train mtp: a {config.model_type} model has no multi-token-prediction head (transformers, vLLM and "
            "llama.cpp define none); Qwen3.5 and Qwen3.5 MoE have one"
        )
    tokenizer = Tokenizer.from_dir(model_path)
    examples = load_sft_data(data_path, tokenizer, settings.max_len)
    sequences = [(ex.ids, [label != IGNORE for label in ex.labels]) for ex in examples]
    ckpt = load_for_training(model_path, settings, lora=None)  # the tower too, where there is one, frozen
    model = ckpt.model.eval()
    torch.manual_seed(settings.seed)
    head = load_mtp(model_path, model) if init == "checkpoint" else None
    if head is None:
        head = new_head(model, settings.seed)
    if generate:
        with torch.inference_mode():
            sequences = own_answers(model, sequences, generate, tokenizer.eos_token_ids)
    history = fit_head(model, head, sequences, settings, pad_token_id(tokenizer), log)
    tensors = {PREFIX + name: t.detach().to("cpu", ckpt.config.torch_dtype) for name, t in head.state_dict().items()}
    save_model(ckpt, Path(out_dir), mtp=tensors)
    return history
