"""Tiny Qwen3.5 checkpoints built with transformers (the reference), for parity tests.

Import from a test module as `from helpers import ...`: tests/ is a rootdir-less directory (no __init__.py),
so pytest's default "prepend" import mode puts tests/ itself on sys.path for `pytest` and `python -m pytest`
alike, whatever the working directory.

Weights: every Linear/Embedding/Conv1d weight is drawn N(0, scale) (transformers' `initializer_range`, default
here 0.2 instead of 0.02: with hidden 64 that gives logits of std ~1.5 and max ~7, far from uniform, so a wrong
layer shows up in the logits). Parameters transformers initialises to constants are drawn too, so that a
swapped or ignored parameter cannot hide: zero-centred RMSNorm weights N(0, 0.1), gated-norm weights
1 + N(0, 0.1), dt_bias 1 + N(0, 0.5), and A = exp(A_log) log-uniform in [1e-3, 2] per value head, so that some
heads keep their recurrent state for hundreds of tokens (across chunk boundaries) and others forget in a few.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import torch
import uvicorn
from PIL import Image
from safetensors.torch import load_file, save_file

from qwenlite.cli import main as cli_main
from qwenlite.config import preset_config
from qwenlite.io.checkpoint import copy_side_files, load_checkpoint, save_checkpoint
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import IM_END, Tokenizer

TINY_TEXT_CONFIG: dict = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,  # more value heads than key heads, as 4B / 9B
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1024,
    # theta differs from qwenlite's default (1e7), so a loader that ignores it fails the parity tests
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

TINY_VISION_CONFIG: dict = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": TINY_TEXT_CONFIG["hidden_size"],
    "patch_size": 4,
    "num_position_embeddings": 16,
}

# A multimodal checkpoint on the real vocabulary: patch 16 x merge 2 (sides multiples of 32, as published), between
# 4 and 16 tokens per image, CLIP's mean and std (not the published 0.5) so a normalisation mix-up shows
MULTIMODAL_PREPROCESSOR: dict = {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, "patch_size": 16,
                                 "temporal_patch_size": 2, "merge_size": 2,
                                 "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                 "image_std": [0.26862954, 0.26130258, 0.27577711],
                                 "image_processor_type": "Qwen2VLImageProcessor"}  # fmt: skip
MULTIMODAL_VISION_CONFIG: dict = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                  "out_hidden_size": TINY_TEXT_CONFIG["hidden_size"], "patch_size": 16,
                                  "num_position_embeddings": 16, "initializer_range": 0.2}  # fmt: skip
# Frames sampled at 2 per second, 4 to 12 of them; all frames' pixels together between 4096 and 65536 (a small clip
# keeps 64 x 64 frames, a larger one is scaled down); CLIP's mean and std as for images.
MULTIMODAL_VIDEO_PREPROCESSOR: dict = {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "patch_size": 16,
                                       "temporal_patch_size": 2, "merge_size": 2, "fps": 2, "min_frames": 4,
                                       "max_frames": 12, "image_mean": MULTIMODAL_PREPROCESSOR["image_mean"],
                                       "image_std": MULTIMODAL_PREPROCESSOR["image_std"],
                                       "video_processor_type": "Qwen3VLVideoProcessor"}  # fmt: skip
IMAGE_PAD = 248056  # <|image_pad|>
VIDEO_PAD = 248057  # <|video_pad|>

MTP_FILE = "model-mtp.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def make_mtp_tensors(text_config: dict = TINY_TEXT_CONFIG, seed: int = 0, scale: float = 0.2) -> dict:
    """The multi-token-prediction head as the published checkpoints carry it: fc over [embed; hidden], three
    norms and one full-attention decoder layer. Deterministic in `seed` (its own generator, not the global RNG)."""
    c = text_config
    H, I, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {
        "mtp.fc.weight": (H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": (H,),
        "mtp.pre_fc_norm_hidden.weight": (H,),
        "mtp.norm.weight": (H,),
        "mtp.layers.0.input_layernorm.weight": (H,),
        "mtp.layers.0.post_attention_layernorm.weight": (H,),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * nh * D, H),  # query and output gate
        "mtp.layers.0.self_attn.k_proj.weight": (nkv * D, H),
        "mtp.layers.0.self_attn.v_proj.weight": (nkv * D, H),
        "mtp.layers.0.self_attn.o_proj.weight": (H, nh * D),
        "mtp.layers.0.self_attn.q_norm.weight": (D,),
        "mtp.layers.0.self_attn.k_norm.weight": (D,),
        "mtp.layers.0.mlp.gate_proj.weight": (I, H),
        "mtp.layers.0.mlp.up_proj.weight": (I, H),
        "mtp.layers.0.mlp.down_proj.weight": (H, I),
    }
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in shapes.items()}


def _randomize(model: torch.nn.Module) -> None:
    """Draw the parameters transformers sets to constants (see the module docstring), in Qwen3.5 and Qwen3.5 MoE."""
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__.replace("Qwen3_5Moe", "Qwen3_5")
            if kind == "Qwen3_5RMSNorm":  # zero-centred: x_hat * (1 + w)
                module.weight.normal_(0.0, 0.1)
            elif kind == "Qwen3_5RMSNormGated":  # plain: w * x_hat * silu(z)
                module.weight.normal_(1.0, 0.1)
            elif kind == "Qwen3_5GatedDeltaNet":
                module.dt_bias.normal_(1.0, 0.5)
                n = module.A_log.numel()
                module.A_log.copy_(torch.empty(n).uniform_(math.log(1e-3), math.log(2.0)))


def make_hf_model(
    *, tied: bool = True, layout: str = "causal_lm", scale: float = 0.2, seed: int = 0, text_config: dict | None = None
):
    """A seeded fp32 transformers model (eval mode, eager attention) with the tiny text config (or `text_config`)."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5TextConfig,
    )

    text = dict(text_config or TINY_TEXT_CONFIG, tie_word_embeddings=tied, initializer_range=scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if layout == "causal_lm":
            config = Qwen3_5TextConfig(**text)
            config._attn_implementation = "eager"
            model = Qwen3_5ForCausalLM(config)
        elif layout == "conditional_generation":
            # as published: mrope sections (identical positions for text, so plain rope) and theta on the text config
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 1, 1], mrope_interleaved=True)
            config = Qwen3_5Config(text_config=text, vision_config=dict(TINY_VISION_CONFIG), tie_word_embeddings=tied)
            config._attn_implementation = "eager"
            model = Qwen3_5ForConditionalGeneration(config)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        _randomize(model)
    return model.float().eval()


def make_hf_checkpoint(
    path: str | Path,
    *,
    tied: bool = True,
    layout: str = "causal_lm",
    shard_bytes: int | None = None,
    add_mtp: bool = False,
    scale: float = 0.2,
    seed: int = 0,
    text_config: dict | None = None,
):
    """Write a tiny checkpoint with transformers' `save_pretrained` and return the transformers model.

    layout "causal_lm": flat `Qwen3_5ForCausalLM` (`model.layers.*`, model_type qwen3_5_text).
    layout "conditional_generation": the published `Qwen3_5ForConditionalGeneration` (`model.language_model.*`,
    a tiny vision tower under `model.visual.*`, model_type qwen3_5).
    shard_bytes: `max_shard_size`, so a small value writes several shards and `model.safetensors.index.json`.
    add_mtp: append `make_mtp_tensors(seed=seed, scale=scale)` in a shard of their own (MTP_FILE), listed in the index
    (an index is written if there was none).
    text_config: instead of TINY_TEXT_CONFIG (not with add_mtp)."""
    path = Path(path)
    assert not (add_mtp and text_config), "the MTP tensors have TINY_TEXT_CONFIG's shapes"
    model = make_hf_model(tied=tied, layout=layout, scale=scale, seed=seed, text_config=text_config)
    kwargs = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    model.save_pretrained(path, **kwargs)
    if add_mtp:
        mtp = make_mtp_tensors(TINY_TEXT_CONFIG, seed=seed, scale=scale)
        save_file(mtp, str(path / MTP_FILE), metadata={"format": "pt"})
        index_path = path / INDEX_FILE
        if index_path.is_file():
            index = json.loads(index_path.read_text())
        else:
            names = load_file(str(path / "model.safetensors")).keys()
            index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
        index["weight_map"].update(dict.fromkeys(mtp, MTP_FILE))
        total = sum(t.numel() * t.element_size() for t in mtp.values())
        index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + total
        index_path.write_text(json.dumps(index, indent=2))
    return model


def make_multimodal_checkpoint(
    path: Path, tokenizer_dir: Path | None, seed: int = 0, vocab_size: int = 248320, token_ids: dict | None = None
):
    """A `Qwen3_5ForConditionalGeneration` (tiny text model on the real 248320 vocabulary, untied, a two-block vision
    tower with lively random weights) written by `save_pretrained` beside the tokenizer files, a
    preprocessor_config.json and a video_preprocessor_config.json; returns the transformers model (fp32, eager
    attention). For a smaller tokenizer already in `path` (tokenizer_dir None): its `vocab_size` and `token_ids`
    (image_token_id, video_token_id, vision_start_token_id, vision_end_token_id)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(TINY_TEXT_CONFIG, vocab_size=vocab_size, initializer_range=0.2, tie_word_embeddings=False)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 1, 1], mrope_interleaved=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = Qwen3_5Config(text_config=text, vision_config=MULTIMODAL_VISION_CONFIG, tie_word_embeddings=False,
                               **(token_ids or {}))  # fmt: skip
        config._attn_implementation = "eager"
        model = Qwen3_5ForConditionalGeneration(config)
        _randomize(model)
    model = model.float().eval()
    model.save_pretrained(path)
    for file in Path(tokenizer_dir).iterdir() if tokenizer_dir else ():
        shutil.copy(file, Path(path) / file.name)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(MULTIMODAL_PREPROCESSOR))
    (Path(path) / "video_preprocessor_config.json").write_text(json.dumps(MULTIMODAL_VIDEO_PREPROCESSOR))
    return model


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: resampling has something to do, and images differ by seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_ids(batch: int, length: int, vocab: int = TINY_TEXT_CONFIG["vocab_size"], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def batched_and_single_decodes(model, vocab: int, lengths=(5, 13, 8), steps: int = 5):
    """Prompts of `lengths` decoded `steps` greedy tokens together, rows at different positions as the engine batches
    them, and each alone: (batched, singles), logits (B, steps, V) each, through the runner as inference calls it."""
    from qwenlite.model import runner
    from qwenlite.model.cache import make_cache

    prompts = [random_ids(1, n, vocab=vocab, seed=n)[0] for n in lengths]

    def decode(cache, firsts):
        tokens, out = firsts, []
        for _ in range(steps):
            logits = runner.run_model(model, tokens, cache)[:, -1]
            out.append(logits)
            tokens = logits.argmax(-1, keepdim=True)
        return torch.stack(out, 1)  # (B, steps, V)

    with torch.no_grad():
        singles = []
        for p in prompts:
            cache = make_cache(model.config, 1, 32, torch.float32)
            runner.run_model(model, p[None, :-1], cache)
            singles.append(decode(cache, p[None, -1:]))
        cache = make_cache(model.config, len(prompts), 32, torch.float32)
        for b, p in enumerate(prompts):
            runner.run_model(model, p[None, :-1], cache.rows(b, b + 1))
        assert cache.lengths.tolist() == [n - 1 for n in lengths]
        return decode(cache, torch.stack([p[-1:] for p in prompts])), torch.cat(singles)


def decode_in_one_call_and_forward(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode through the one-call C step (its logits for each step), and the pure-torch forward's logits over
    the same tokens: (step logits (B, steps, V), forward logits (B, steps, V))."""
    from qwenlite.model import runner
    from qwenlite.model.cache import make_cache
    from qwenlite.model.qwen3_5 import set_fast

    cache = make_cache(model.config, prompt.shape[0], prompt.shape[1] + steps, model.dtype)
    with torch.inference_mode():
        logits = runner.run_model(model, prompt, cache)[:, -1]
        tokens, rows = [], []
        for _ in range(steps):
            rows.append(logits)
            tokens.append(logits.argmax(-1))
            logits = runner.run_model(model, tokens[-1][:, None], cache)[:, -1]
        assert model.__dict__["_decode_plan"].layers is not None  # the C step ran
        set_fast(model, False)
        ids = torch.cat([prompt, torch.stack(tokens[:-1], 1)], 1)
        reference = model(ids)[:, prompt.shape[1] - 1 :].float()
        set_fast(model, True)
    return torch.stack(rows, 1), reference


def tracked_step_against_plain_decoding(model, vocab: int, lengths=(9, 13, 5), keeps=(1, 4, 2), T: int = 4) -> dict:
    """Rows of random prompts of `lengths`, each at its own position, T random tokens each through one tracked
    one-call step (model/runner.step_in_one_call, asserted to have run in C), rewound to keep the first keeps[b]; and
    each row alone, prefilled the same way and fed its kept tokens by plain decode steps. -> the largest absolute
    difference of the step's logits at the kept positions and of each part of the caches ("logits", "kv", "conv",
    "state"; the recurrent parts absent for a model without Gated DeltaNet layers), lengths asserted equal."""
    from qwenlite.generate import decode_step, prefill
    from qwenlite.model import runner
    from qwenlite.model.cache import AttentionCache, make_cache

    prompts = [random_ids(1, n, vocab=vocab, seed=n)[0].tolist() for n in lengths]
    ids = random_ids(len(lengths), T, vocab=vocab, seed=3)
    worst: dict[str, float] = {}

    def note(name, a, b):
        worst[name] = max(worst.get(name, 0.0), (a.float() - b.float()).abs().max().item())

    with torch.inference_mode():
        batch = make_cache(model.config, len(lengths), 32, model.dtype)
        for b, p in enumerate(prompts):
            prefill(model, p, batch.rows(b, b + 1))
        batch.track()
        out = runner.step_in_one_call(model, ids, batch)
        assert out is not None  # the step ran in C
        logits = out[1]
        batch.rewind(T, list(keeps))
        for b, (p, keep) in enumerate(zip(prompts, keeps, strict=True)):
            plain = make_cache(model.config, 1, 32, model.dtype)
            prefill(model, p, plain)
            rows = [decode_step(model, t, plain) for t in ids[b, :keep].tolist()]
            note("logits", torch.stack(rows), logits[b, :keep])
            mine, n = batch.rows(b, b + 1), len(p) + keep
            assert mine.lengths.tolist() == plain.lengths.tolist() == [n]
            for x, y in zip(mine.layers, plain.layers, strict=True):
                if isinstance(x, AttentionCache):
                    note("kv", x.k[:, :, :n], y.k[:, :, :n])
                    note("kv", x.v[:, :, :n], y.v[:, :, :n])
                else:
                    note("conv", x.conv, y.conv)
                    note("state", x.state, y.state)
    return worst


def engine_and_generate_outputs(model, vocab: int, lengths=(4, 11, 7), max_tokens: int = 10):
    """Greedy requests of `lengths` random tokens through the serving engine together, and each through
    `generate_tokens` alone: (engine's ids per request, generate's ids per request)."""
    import queue

    from qwenlite.generate import generate_tokens
    from qwenlite.sample import SamplingParams
    from qwenlite.serve.engine import Finish, Request

    greedy = SamplingParams(temperature=0.0)
    prompts = [random_ids(1, n, vocab=vocab, seed=n)[0].tolist() for n in lengths]
    engine = Engine(model, max_concurrency=4, ctx=64)
    try:
        queues = [queue.SimpleQueue() for _ in prompts]
        for prompt, q in zip(prompts, queues, strict=True):
            engine.submit(Request(prompt, greedy, max_tokens), q.put)
        served = []
        for q in queues:
            events = []
            while not isinstance(event := q.get(timeout=60), Finish):
                events.append(event.id)
            served.append(events)
    finally:
        engine.close()
    return served, [list(generate_tokens(model, p, greedy, max_tokens)) for p in prompts]


def greedy_against_transformers(hf_model, model, vocab: int, n: int = 16) -> tuple[list[int], list[int]]:
    """`n` greedy tokens after a random 9-token prompt: (ours through `generate_tokens`, transformers' `generate`)."""
    from qwenlite.generate import generate_tokens
    from qwenlite.sample import SamplingParams

    prompt = random_ids(1, 9, vocab=vocab, seed=42)
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    got = list(generate_tokens(model, prompt[0].tolist(), SamplingParams(temperature=0.0), max_tokens=n))
    return got, expected[0, 9:].tolist()


def markov_ids(successors: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences of a chain where each token has 3 successors (probabilities 0.7 / 0.2 / 0.1), as test_quant.py's."""
    choice = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), batch * length, True, generator=gen).view(batch, length)
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, 256, (batch,), generator=gen)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], choice[:, t]]
    return x


def train_on_markov_chain(model, gen: torch.Generator, steps: int = 60, lr: float = 5e-3) -> tuple[torch.Tensor, float]:
    """Train `model` (vocab >= 256) with AdamW on a random chain over ids 0..255 so that its predictions are
    confident: (the chain's successor table, for held-out ids; the last step's loss)."""
    successors = torch.randint(0, 256, (model.config.vocab_size, 3), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        x = markov_ids(successors, 16, 40, gen)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return successors, loss.item()


@torch.no_grad()
def reference_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-forward logits (B, T, V) fp32 of a transformers model, no cache."""
    return hf_model(input_ids=input_ids, use_cache=False).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset (hidden 128, the real vocabulary) with lively random weights, built once per session: the
    preset's N(0, 0.02) weights and tied head make a model that repeats its last input token; layer matrices
    drawn at 0.2 and an untied head make its greedy answers depend on the whole prompt."""
    path = tmp_path_factory.getbasetemp() / "tiny-serve-checkpoint"
    if (path / "config.json").is_file():
        return path
    assert cli_main(["init-random", "tiny", str(path / "base"), "--dtype", "float32"]) == 0
    model = load_checkpoint(path / "base").model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.2, generator=generator)
        head = torch.randn(model.lm_head.weight.shape, generator=generator) * 0.2
    return save_untied(model, head, path)


def save_untied(model, head: torch.Tensor, path: Path) -> Path:
    """Write `model` with `head` as its own (untied) output matrix to `path`, beside the tokenizer and generation
    files of the random checkpoint it was made from (`path`/base, removed)."""
    model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    model.lm_head.weight = torch.nn.Parameter(head)
    save_checkpoint(model, path)
    copy_side_files(path / "base", path)
    shutil.rmtree(path / "base")
    return path


def scripted_checkpoint(path: Path, script: list[str | int]) -> Path:
    """The tiny preset made to write `script` (texts and token ids) when decoded greedily after a prompt that ends
    in the script's first token, then <|im_end|>. Every layer's weights are zero, so each layer adds nothing and the
    last hidden state is the current token's embedding; the untied head's row for token b is the embedding of the
    token a it follows in the script (normalised), and every other row is zero. So the next token is a function of
    the current one: the script's tokens must be distinct."""
    if (path / "config.json").is_file():
        return path
    assert cli_main(["init-random", "tiny", str(path / "base"), "--dtype", "float32"]) == 0
    model = load_checkpoint(path / "base").model
    tok = Tokenizer.from_dir(path / "base")
    ids = [i for piece in script for i in ([piece] if isinstance(piece, int) else tok.encode(piece))]
    assert len(set(ids)) == len(ids), f"a token of the script would have two successors: {ids}"
    chain = [*ids, tok.token_to_id(IM_END)]
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            parameter.zero_()
        embed = model.model.embed_tokens.weight
        head = torch.zeros_like(embed)
        for a, b in itertools.pairwise(chain):
            head[b] = embed[a] / embed[a].norm() * 10
    return save_untied(model, head, path)


def qwen36_style_template() -> str:
    """The packaged Qwen3.5 template with the two variables the newer templates read: Qwen3.6's condition for keeping
    an assistant turn's reasoning (`preserve_thinking`, else only turns after the last user query), and a
    `reasoning_effort` that Qwen3.8's validates (here written into the generation prompt, where a test sees it)."""
    from qwenlite.text.vocab import qwen35_chat_template

    source = qwen35_chat_template()
    old = "{%- if loop.index0 > ns.last_query_index %}"
    assert source.count(old) == 1
    keep = ("{%- if (preserve_thinking is defined and preserve_thinking is true)"
            " or (loop.index0 > ns.last_query_index) %}")  # fmt: skip
    effort = (
        "{%- if reasoning_effort is defined and reasoning_effort not in ('low', 'medium', 'xhigh') %}"
        "{{- raise_exception('reasoning_effort must be low, medium or xhigh') }}{%- endif %}"
    )
    prompt = "{{- '<|im_start|>assistant\\n' }}"
    assert source.count(prompt) == 1, prompt
    with_effort = prompt + (
        "{%- if reasoning_effort is defined %}{{- 'Effort: ' + reasoning_effort + '\\n' }}{%- endif %}"
    )
    return effort + source.replace(old, keep).replace(prompt, with_effort)


def console_script(name: str = "qwenlite") -> str:
    """The installed console script of the environment running the tests (beside its python, whether or not that
    environment's bin is on PATH), else the one on PATH. Run it with this process's environment: PYTHONPATH, when
    set, decides which qwenlite it imports."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"the {name} console script is not installed"
    return found


class LiveServer:
    """uvicorn in a thread, on a free localhost port."""

    def __init__(self, app, engine: Engine):
        self.engine = engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


def wait_until(condition, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return time.perf_counter() - t0


SCRIPT_EOS = 248046  # <|im_end|> in the Qwen3.5 vocabulary


class ScriptedModel(torch.nn.Module):
    """Stands in for the network in a batch: each row answers with the script whose marker text appears last in
    its prompt, token by token, then <|im_end|>. The row's script and position live in its cache (the first
    recurrent state's first entries), so they move with the row through copy_row, snapshots and restores."""

    def __init__(self, tok: Tokenizer, scripts: dict[str, list], delay: float = 0.0):
        super().__init__()
        self.config = preset_config("tiny")
        self.dtype, self.device = torch.float32, torch.device("cpu")  # what generation and the engine ask
        self.tok, self.markers, self.delay = tok, list(scripts), delay
        self.scripts = [sum(([p] if isinstance(p, int) else tok.encode(p) for p in s), []) for s in scripts.values()]

    def _script(self, ids: list[int]) -> int | None:
        text = self.tok.decode(ids)
        where = [(text.rfind(m), k) for k, m in enumerate(self.markers)]
        position, k = max(where)
        return k if position >= 0 else None

    def forward(self, ids, cache, logits_to_keep=0):
        B, T = ids.shape
        state = cache.layers[0].state  # (B, Hv, Dk, Dv): [b, 0, 0, 0] = script, [b, 0, 0, 1] = position
        if T > 1 or logits_to_keep == 1:  # a prefill piece, of one row
            k = self._script(ids[0].tolist())
            if k is not None:
                state[0, 0, 0, 0] = k
            state[0, 0, 0, 1] = 0
        time.sleep(self.delay)
        logits = torch.full((B, 1, self.config.vocab_size), -100.0)  # any temperature picks the script
        for b in range(B):
            script, pos = self.scripts[int(state[b, 0, 0, 0])], int(state[b, 0, 0, 1])
            logits[b, 0, script[pos] if pos < len(script) else SCRIPT_EOS] = 10.0
            state[b, 0, 0, 1] = pos + 1
        cache.lengths += T
        return logits


# Structured output (test_grammar.py, test_structured_output.py): every string bounded, so that a constrained answer
# must end (then only <|im_end|> is allowed).
SCHEMAS = {
    "enum-bool-int": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": -5, "maximum": 250},
        },
        "required": ["colour", "ok", "n"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 6},
            "authors": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 5},
                        "email": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
                    },
                    "required": ["name", "email"],
                    "additionalProperties": False,
                },
            },
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        },
        "required": ["title", "authors", "year"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "hourly": {"type": "boolean"},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "number"},
                    "b": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
                    "note": {"type": ["string", "null"], "maxLength": 3},
                },
                "required": ["a", "b"],
            },
        },
    },
]


class ScriptThenNoise(torch.nn.Module):
    """Stands in for the network (logits of `vocab_size`: by default the tiny chat model's, tiny_chat.py): writes
    `script` (texts and token ids; say reasoning, then </think>), then random logits in which `closers` (token ids)
    stand out. For constrained decoding: the reasoning shows whether the constraint left it alone, the answer whether
    the constraint took over after </think>, and the closers make an open-ended constraint (any JSON object) end
    soon; without a constraint it writes noise with brackets in it, never JSON. A row's position lives in its cache
    (the first recurrent state's first entry), as in ScriptedModel."""

    def __init__(self, tok: Tokenizer, script: list, closers: list[int] = (), vocab_size: int = 512):
        super().__init__()
        self.config = dataclasses.replace(preset_config("tiny"), vocab_size=vocab_size)
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.script = [i for piece in script for i in ([piece] if isinstance(piece, int) else tok.encode(piece))]
        self.noise = torch.randn(16, vocab_size, generator=torch.Generator().manual_seed(0)) * 3  # (16, V)
        self.noise[:, list(closers)] += 5.0

    def forward(self, ids, cache, logits_to_keep=0):
        B, T = ids.shape
        position = cache.layers[0].state[:, 0, 0, 0]  # (B,)
        if T > 1 or logits_to_keep == 1:  # a prefill piece, of one row
            position[0] = 0
        logits = torch.empty(B, 1, self.config.vocab_size)
        for b in range(B):
            pos = int(position[b])
            if pos < len(self.script):
                logits[b, 0] = -100.0
                logits[b, 0, self.script[pos]] = 10.0
            else:
                logits[b, 0] = self.noise[pos % len(self.noise)]
            position[b] = pos + 1
        cache.lengths += T
        return logits


def kl_and_top1(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || out) over positions, and how often the two agree on the most likely token."""
    lp, lq = ref.float().log_softmax(-1), out.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (ref.argmax(-1) == out.argmax(-1)).float().mean().item()


class PatternDraft:
    """A speculative draft (speculative.Draft) that proposes plain decoding's own tokens, wrong (the right token + 1)
    where `wrong(round, j)` says. `refs` maps each prompt (a tuple) to plain decoding's tokens for it, so that one
    maker serves the rows of a batch (the server's engine). Checks that it is handed the hidden states of exactly
    the positions the model ran since its last call."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]], wrong=lambda r, j: False):
        self.refs, self.wrong = refs, wrong

    def begin(self, max_seq_len):
        self.round, self.ref = 0, None

    def propose(self, tokens, hidden, k, pick):
        if self.ref is None:  # the first call: the whole prompt ran
            prompt = next(p for p in self.refs if tuple(tokens[: len(p)]) == p)
            self.prompt_len, self.ref, self.expect_hidden = len(prompt), self.refs[prompt], len(prompt)
        assert hidden.shape[0] == self.expect_hidden
        g = len(tokens) - self.prompt_len  # generated so far, the pending token included
        right = [self.ref[g + j] if g + j < len(self.ref) else 0 for j in range(k)]
        V = TINY_TEXT_CONFIG["vocab_size"]
        drafts = [((t + 1) % V if self.wrong(self.round, j) else t, None) for j, t in enumerate(right)]
        kept = next((j for j in range(k) if drafts[j][0] != right[j]), k)
        self.round, self.expect_hidden = self.round + 1, kept + 1
        return drafts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, pool_below: float = 5.0) -> float:
    """p-value of the chi-square test of `counts` against `probs`; cells expecting fewer than `pool_below` pooled."""
    expected = probs.double() * counts.sum()
    small = expected < pool_below
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))
