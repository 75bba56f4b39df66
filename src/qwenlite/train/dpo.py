"""Direct preference optimisation (sigmoid loss) against a frozen reference.

Data: JSONL, one preference pair per line:

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": {"role": "assistant", "content": "...", "reasoning_content": "..."},
     "rejected": [{"role": "assistant", "content": "", "tool_calls": [...]}, {"role": "tool", ...}, ...],
     "tools": [...]}

`prompt` is a string (one user turn) or a list of messages; `chosen` and `rejected` are each a string (one
assistant turn), one assistant message, or a list of messages continuing the prompt. Each side is rendered whole
with the chat template (prompt + completion), and only the completion's assistant tokens count, labelled as SFT
labels them (see sft.py).

Loss per pair: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), where log pi(x) is the
summed log-probability of the completion's tokens. The reference is the model as it starts: its log-probabilities
are computed once, before the first update, with the LoRA adapters disabled when training LoRA; so there is never
a second copy of the weights, and at step 0 the loss is exactly log 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.common import FINE_TUNING_BETAS, Logger, TrainSettings, make_optimizer, run_steps
from qwenlite.train.lora import lora_disabled
from qwenlite.train.moe import aux_loss_enabled
from qwenlite.train.posttrain import (
    LoRASettings,
    epoch_order,
    forward_logprobs,
    load_for_training,
    log_line,
    pad_batch,
    pad_token_id,
    read_jsonl,
    save_result,
)
from qwenlite.train.sft import Example, encode_chat


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0  # summed log-probabilities under the reference
    ref_rejected: float = 0.0


def _messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise QwenliteError(f'{where}: "{field}" must be a string, a message or a non-empty list of messages')


def load_dpo_data(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[Pair]:
    """Read, validate and encode every pair before training starts (errors name the file and line)."""
    pairs = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        for field in ("prompt", "chosen", "rejected"):
            if field not in record:
                raise QwenliteError(f'{where}: missing "{field}"')
        prompt = _messages(record["prompt"], "user", where, "prompt")
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise QwenliteError(f'{where}: "tools" must be a list')
        sides = []
        for field in ("chosen", "rejected"):
            completion = _messages(record[field], "assistant", where, field)
            if not any(m.get("role") == "assistant" for m in completion):
                raise QwenliteError(f'{where}: "{field}" has no assistant turn')
            example = encode_chat(tokenizer, prompt + completion, tools, len(prompt), f"{where} ({field})")
            example.ids, example.labels = example.ids[:max_len], example.labels[:max_len]
            if example.n_trained == 0:
                raise QwenliteError(f"{where}: the {field} answer starts after {max_len} tokens (raise --max-len)")
            sides.append(example)
        pairs.append(Pair(*sides))
    if not pairs:
        raise QwenliteError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def sequence_logps(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log-probability of each example's labelled tokens: (N,) fp32; and a MoE's load-balancing loss of that
    forward (train/moe.py), None where the config does not ask for it."""
    ids, labels = pad_batch([(ex.ids, ex.labels) for ex in examples], pad_id)
    logps, aux = forward_logprobs(model, ids, labels, lengths=[len(ex.ids) for ex in examples])
    return logps.sum(-1), aux


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, batch_size: int) -> None:
    """Fill in the reference log-probabilities: the model as it is now, adapters (if any) disabled."""
    was_training = model.training
    model.eval()
    with lora_disabled(model):
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            logps, _ = sequence_logps(model, [p.chosen for p in batch] + [p.rejected for p in batch], pad_id)
            for p, c, r in zip(batch, logps[: len(batch)].tolist(), logps[len(batch) :].tolist(), strict=True):
                p.ref_chosen, p.ref_rejected = c, r
    model.train(was_training)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); rewards are beta * (log pi - log ref)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def train_dpo(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    lora: LoRASettings | None = None,
    beta: float = 0.1,
    log: Logger = log_line,
) -> list[dict]:
    """Preference-tune the checkpoint at `model_path` on the pairs in `data_path`; write the result to `out_dir`
    as SFT does. Returns the log records (loss, chosen/rejected rewards, margin, accuracy)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    settings = settings or TrainSettings()
    tokenizer = Tokenizer.from_dir(model_path)
    pairs = load_dpo_data(data_path, tokenizer, settings.max_len)
    pad_id = pad_token_id(tokenizer)

    torch.manual_seed(settings.seed)
    ckpt = load_for_training(model_path, settings, lora)
    model = ckpt.model
    reference_logps(model, pairs, pad_id, settings.batch_size)
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, FINE_TUNING_BETAS)
    total_steps = settings.total_steps(len(pairs))
    per_step = settings.batch_size * settings.grad_accum
    order = epoch_order(len(pairs), total_steps * per_step, settings.seed)

    def train_step() -> tuple[dict, int]:  # one optimizer step's micro-batches; the loop is common.run_steps
        stats = torch.zeros(4)  # loss, chosen reward, rejected reward, accuracy: summed over the step's pairs
        tokens, aux_loss = 0, 0.0
        for _ in range(settings.grad_accum):
            batch = [pairs[next(order)] for _ in range(settings.batch_size)]
            logps, aux = sequence_logps(model, [p.chosen for p in batch] + [p.rejected for p in batch], pad_id)
            ref = torch.tensor([[p.ref_chosen for p in batch], [p.ref_rejected for p in batch]], device=logps.device)
            losses, chosen_r, rejected_r = dpo_loss(logps[: len(batch)], logps[len(batch) :], ref[0], ref[1], beta)
            objective = losses.sum() / per_step
            if aux is not None:  # a MoE's load-balancing loss (train/moe.py), as TRL adds it: its mean per step
                aux_loss += aux.item() / settings.grad_accum
                objective = objective + model.config.router_aux_loss_coef * aux / settings.grad_accum
            objective.backward()
            stats += torch.stack([losses.detach().sum(), chosen_r.sum(), rejected_r.sum(),
                                  (chosen_r > rejected_r).float().sum()]).cpu()  # fmt: skip
            tokens += sum(len(p.chosen.ids) + len(p.rejected.ids) for p in batch)
        loss, chosen, rejected, accuracy = (stats / per_step).tolist()
        fields = {"loss": loss, "reward_chosen": chosen, "reward_rejected": rejected,
                  "reward_margin": chosen - rejected, "accuracy": accuracy}  # fmt: skip
        if aux_loss_enabled(model.config):
            fields["aux_loss"] = aux_loss
        return fields, tokens

    history = run_steps(model, optimizer, settings, total_steps, train_step, log)
    save_result(ckpt, out_dir, lora, history)
    return history
