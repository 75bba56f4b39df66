"""Many LoRA adapters on one model, chosen per row (model/adapters.py, io/adapters.py): rows with different adapters
in one batch each compute what that adapter merged into the base computes alone (vLLM #49354: adapters that
silently do nothing), through the runner's decode path, on an fp32 and an int8 base; adapters that do not fit the
base are refused at load with their name and the mismatch. Then the server (`qwenlite serve BASE --lora NAME=PATH`):
the engine batches requests of the base and two adapters, each answering as its merged model alone; the prompt cache
never restores a state across adapters; the HTTP API routes by `model` and lists the adapters; a misfit stops the
start-up.

The references are built from the in-memory LoRA layers that wrote the adapters (W + scaling * B @ A), not from
the files, so a reader that transposed or dropped a tensor would fail here too."""

import json
import queue
import re

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from qwenlite.cli.main import main
from qwenlite.config import ModelConfig
from qwenlite.errors import CheckpointError
from qwenlite.generate import generate_tokens
from qwenlite.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.model.adapters import Adapter, AdapterLinear, adapter_selection, attach_adapters
from qwenlite.model.cache import make_cache
from qwenlite.model.quantized import QuantLinear, quantize_model
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.model.runner import run_model
from qwenlite.ops.cpu import kernels
from qwenlite.sample import SamplingParams
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine, Finish, Request, Token
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.lora import DEFAULT_TARGETS, apply_lora, lora_modules, save_adapter

from helpers import TINY_TEXT_CONFIG, max_abs_diff, random_ids
from tiny_chat import make_chat_checkpoint
from train_helpers import single_threaded

VOCAB = 512
# Two adapters unlike each other: every default target at rank 4, and a few targets plus the head at rank 2.
ADAPTERS = {"fr": (4, DEFAULT_TARGETS, 1), "de": (2, ("q_proj", "in_proj_qkv", "down_proj", "lm_head"), 2)}
STEPS = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():  # see train_helpers: a neighbour on the other core stalls two-thread OpenMP
        yield


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(root: base/ and one directory per adapter, {name: {module path: scaling * B @ A}})."""
    root = tmp_path_factory.mktemp("multilora")
    make_chat_checkpoint(root / "base")  # the tiny model with a tokenizer and chat template, for the server
    deltas = {}
    for name, (r, targets, seed) in ADAPTERS.items():
        model = base_model(root)
        apply_lora(model, r=r, targets=targets, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        for m in lora_modules(model).values():
            m.lora_B.weight.data.normal_(0.0, 0.2, generator=gen)  # B = 0 would make every adapter the base
        deltas[name] = {path: m.delta_weight().detach() for path, m in lora_modules(model).items()}
        save_adapter(model, root / name)
    return root, deltas


def base_model(root):
    return load_checkpoint(root / "base", dtype="float32").model


@torch.no_grad()
def merged(model, delta: dict[str, torch.Tensor]):
    """`model` with W += delta per module: an adapter merged, on fp32 weights (an int8 model's dequantized ones)."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # a head LoRA leaves the embedding be
    for path, d in delta.items():
        model.get_submodule(path).weight += d
    return model


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows' prompts in one prefill forward, then `steps` greedy decode steps of all rows together through
    the runner, as inference runs them: (tokens (B, steps), logits (B, steps, V))."""
    B, T = prompts.shape
    cache = make_cache(model.config, B, T + steps + 1, torch.float32)
    logits = run_model(model, prompts, cache, logits_to_keep=1)[:, -1]
    tokens, out = [], []
    for _ in range(steps):
        out.append(logits)
        tokens.append(logits.argmax(-1))
        logits = run_model(model, tokens[-1][:, None], cache)[:, -1]
    return torch.stack(tokens, 1), torch.stack(out, 1)


def test_rows_with_different_adapters_equal_each_merged_model(adapters, monkeypatch):
    root, deltas = adapters
    model = base_model(root)
    prompts = random_ids(5, 7, vocab=VOCAB, seed=11)
    steps = []  # the batch size of each decode step taken in one C call, which knows nothing of adapters
    decode_step = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda model, x: steps.append(model.rows) or decode_step(model, x))
    base_tokens, base_logits = greedy(model, prompts)
    assert steps == ([5] * STEPS if kernels.available() else [])

    selection = load_adapters(model, [(name, root / name) for name in ADAPTERS])
    assert selection.names == ["fr", "de"] and adapter_selection(model) is selection
    assert sum(isinstance(m, AdapterLinear) for m in model.modules()) == len(
        set(deltas["fr"]) | set(deltas["de"])
    )  # fmt: skip
    rows = [1, 0, 2, 1, 2]  # fr, base, de, fr, de: an adapter's rows need not be together
    steps.clear()
    with selection.selected(rows):
        tokens, logits = greedy(model, prompts)
    assert not steps  # rows on adapters decode through the forward

    references = {0: (base_tokens, base_logits)}
    for index, name in enumerate(ADAPTERS, 1):
        references[index] = greedy(merged(base_model(root), deltas[name]), prompts)
    for b, a in enumerate(rows):
        ref_tokens, ref_logits = references[a]
        assert tokens[b].tolist() == ref_tokens[b].tolist(), (b, a)
        assert max_abs_diff(logits[b], ref_logits[b]) < 1e-4, (b, a)
        if a:  # the adapter changes the answer, so the equality above is the adapter's and not the base's
            assert max_abs_diff(ref_logits[b], base_logits[b]) > 1.0
            assert tokens[b].tolist() != base_tokens[b].tolist()
    # Every row on the base: the C step again, over the base layers the adapters wrap.
    steps.clear()
    tokens, logits = greedy(model, prompts)
    assert torch.equal(tokens, base_tokens) and torch.equal(logits, base_logits)
    assert steps == ([5] * STEPS if kernels.available() else [])


def test_adapters_on_an_int8_base(adapters):
    """The AdapterLinear around a QuantLinear: each row equals its adapter merged into the int8 model's own
    (dequantized) weights, and together equals alone."""
    root, deltas = adapters
    model = quantize_model(base_model(root), 8)
    weights = {path: m.dequantized_weight() for path, m in model.named_modules() if isinstance(m, QuantLinear)}

    def reference(delta):
        ref = base_model(root)
        for path, w in weights.items():
            ref.get_submodule(path).weight.data = w.clone()  # the tied head's: the embedding's too, as quantized
        return merged(ref, delta)

    selection = load_adapters(model, [(name, root / name) for name in ADAPTERS])
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj").base_layer, QuantLinear)
    prompts = random_ids(3, 6, vocab=VOCAB, seed=12)
    rows = [2, 0, 1]
    with selection.selected(rows):
        tokens, logits = greedy(model, prompts)
    base_tokens, _ = greedy(reference({}), prompts)
    for b, a in enumerate(rows):
        ref_tokens, ref_logits = greedy(reference(deltas[[None, *ADAPTERS][a]] if a else {}), prompts[b : b + 1])
        assert tokens[b].tolist() == ref_tokens[0].tolist(), (b, a)
        assert max_abs_diff(logits[b], ref_logits[0]) < 1e-3, (b, a)
        assert (tokens[b].tolist() != base_tokens[b].tolist()) == (a != 0)
        with selection.selected([a]):
            alone, _ = greedy(model, prompts[b : b + 1])
        assert alone[0].tolist() == tokens[b].tolist()


def test_selection_is_checked(adapters):
    root, _ = adapters
    model = base_model(root)
    selection = load_adapters(model, [("fr", root / "fr")])
    with pytest.raises(ValueError, match="adapter index 2 out of range"):
        selection.select([0, 2])
    selection.select([1, 0])
    with pytest.raises(ValueError, match="selected for 2 rows, but a layer sees \\(4, 1\\)"):
        greedy(model, random_ids(4, 1, vocab=VOCAB))  # 4 tokens, as 2 rows of 2 would be: still refused
    with pytest.raises(CheckpointError, match="already carries adapters"):
        load_adapters(model, [("de", root / "de")])


@torch.no_grad()
def test_a_moe_shared_expert_takes_adapters_and_routed_experts_are_refused():
    """The shared expert sees its tokens flattened to (B * T, hidden): token m is row m // T. Routed experts see
    them regrouped by expert, which no row index can follow, so an adapter on one is refused."""
    config = ModelConfig.from_dict(dict(TINY_TEXT_CONFIG, model_type="qwen3_5_moe_text", num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=24,
                                        shared_expert_intermediate_size=40))  # fmt: skip
    model, reference = Qwen3_5ForCausalLM(config).eval(), Qwen3_5ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # the documented initialisation, matrices livelier
        p.copy_(initial_value(name, p.shape, gen) if p.dim() < 2 else torch.randn(p.shape, generator=gen) * 0.2)
    reference.load_state_dict(model.state_dict())
    path = "model.layers.1.mlp.shared_expert.up_proj"
    A, B = torch.randn(3, 64) * 0.2, torch.randn(40, 3) * 0.2
    reference.get_submodule(path).weight += 1.5 * B @ A
    expert = Adapter("moe", 3, 4.5, 1.5, {"model.layers.1.mlp.experts.2.up_proj": (torch.zeros(3, 64), B[:24])})
    with pytest.raises(CheckpointError, match="adapter moe: model.layers.1.mlp.experts.2.up_proj is a routed"):
        attach_adapters(model, [expert])
    selection = attach_adapters(model, [Adapter("shared", 3, 4.5, 1.5, {path: (A, B)})])
    ids = random_ids(2, 5, vocab=VOCAB, seed=4)
    with selection.selected([0, 1]):
        out = model(ids)
    assert max_abs_diff(out[0], reference(ids[:1])[0]) > 1e-2  # the shared expert's adapter matters
    assert max_abs_diff(out[1], reference(ids[1:])[0]) < 1e-4
    assert max_abs_diff(out[0], model(ids[:1])[0]) < 1e-4  # row 0 is the base


def edited(root, name: str, out, config=None, tensors=None):
    """A copy of adapter `name` in `out` with its config updated by `config` and its tensors by `tensors` (a
    function of the dict)."""
    out.mkdir()
    cfg = json.loads((root / name / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(str(root / name / ADAPTER_WEIGHTS))
    save_file(tensors(weights) if tensors else weights, str(out / ADAPTER_WEIGHTS))
    return out


KEY = "base_model.model.model.layers.3.self_attn.q_proj"


def renamed(weights: dict) -> dict:
    return {k.replace("layers.3.self_attn", "layers.9.self_attn"): v for k, v in weights.items()}


def narrower(weights: dict) -> dict:
    return {**weights, f"{KEY}.lora_A.weight": weights[f"{KEY}.lora_A.weight"][:, :32].contiguous()}


def other_vocabulary(weights: dict) -> dict:
    return {**weights, "base_model.model.lm_head.lora_B.weight": torch.randn(1000, 2)}


def embedding_copy(weights: dict) -> dict:
    return {**weights, "base_model.model.model.embed_tokens.weight": torch.randn(VOCAB + 8, 64)}


def unpaired(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if k != f"{KEY}.lora_B.weight"}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        (None, renamed, "targets model.layers.9.self_attn.q_proj, which the base lacks"),
        ({"r": 8}, None, "rank 2 \\(A\\) / 2 \\(B\\), but adapter_config.json says r = 8"),
        (None, narrower, "q_proj is 32 -> 256 .*the base's is 64 -> 256"),
        (None, other_vocabulary, "trained on a vocabulary of 1000 tokens .*the base has 512"),
        (None, embedding_copy, "trained on a vocabulary of 520 tokens .*embed_tokens"),
        (None, unpaired, "layers.3.self_attn.q_proj has no lora_B"),
        ({"peft_type": "IA3"}, None, "peft_type 'IA3' is not supported"),
        ({"use_dora": True}, None, "use_dora is not supported"),
    ],
)  # fmt: skip
def test_an_adapter_that_does_not_fit_is_refused_with_its_name(adapters, tmp_path, config, tensors, message):
    root, _ = adapters
    model = base_model(root)
    bad = edited(root, "de", tmp_path / "bad", config, tensors)
    with pytest.raises(CheckpointError, match=f"adapter bad-one\\b.*{message}"):
        load_adapters(model, [("fr", root / "fr"), ("bad-one", bad)])
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # all or nothing


def test_an_adapter_on_the_vision_tower_is_refused(adapters, tmp_path):
    root, _ = adapters
    model = base_model(root)
    model.visual = torch.nn.Sequential(torch.nn.Linear(64, 64))  # a stand-in tower: its patches are no rows
    weights = {"base_model.model.visual.0.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.visual.0.lora_B.weight": torch.zeros(64, 2)}  # fmt: skip
    bad = edited(root, "de", tmp_path / "eyes", tensors=lambda w: {**w, **weights})
    with pytest.raises(CheckpointError, match="adapter eyes: targets visual.0, outside the text model's layers"):
        load_adapters(model, [("eyes", bad)])


def test_missing_or_corrupt_adapter_files(adapters, tmp_path):
    root, _ = adapters
    model = base_model(root)
    with pytest.raises(CheckpointError, match="adapter gone .*adapter_config.json is missing"):
        load_adapters(model, [("gone", tmp_path / "nowhere")])
    broken = edited(root, "fr", tmp_path / "broken")
    data = (broken / ADAPTER_WEIGHTS).read_bytes()
    (broken / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter broken .*cannot read the adapter"):
        load_adapters(model, [("broken", broken)])
    (broken / ADAPTER_WEIGHTS).write_bytes(data)
    (broken / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter broken .*cannot read the adapter"):
        load_adapters(model, [("broken", broken)])


# --- the server ------------------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0)


def served_model(root):
    model = base_model(root)
    load_adapters(model, [(name, root / name) for name in ADAPTERS])
    return model


def merged_answer(root, deltas, adapter: int, prompt: list[int], max_tokens: int, stop=()) -> list[int]:
    """What `adapter` (0: the base) merged into the base answers alone, greedy, through generate_tokens."""
    model = base_model(root) if adapter == 0 else merged(base_model(root), deltas[[*ADAPTERS][adapter - 1]])
    with torch.no_grad():
        return list(generate_tokens(model, prompt, GREEDY, max_tokens, stop))


def answers(engine: Engine, requests: list[Request]) -> list[tuple[list[int], Finish]]:
    """Submit all of `requests` before the engine looks at its queue (so they prefill and decode together), then
    each one's tokens and finish."""
    queues = [queue.SimpleQueue() for _ in requests]
    with engine.scheduler.cond:  # the engine thread waits on it for work
        for request, q in zip(requests, queues, strict=True):
            engine.submit(request, q.put)
    out = []
    for q in queues:
        events = []
        while not events or not isinstance(events[-1], Finish):
            events.append(q.get(timeout=60))
        out.append(([e.id for e in events if isinstance(e, Token)], events[-1]))
    return out


def test_the_engine_batches_the_base_and_two_adapters(adapters):
    root, deltas = adapters
    engine = Engine(served_model(root), max_concurrency=4, ctx=64)
    try:
        assert engine.adapter_names == ["fr", "de"]
        adapter_of = [1, 0, 2, 1]
        prompts = [random_ids(1, n, vocab=VOCAB, seed=n)[0].tolist() for n in (5, 9, 7, 6)]
        got = answers(engine, [Request(p, GREEDY, 10, adapter=a) for p, a in zip(prompts, adapter_of, strict=True)])
        assert engine.max_batch == 4  # all four rows decoded in the same steps
    finally:
        engine.close()
    base = merged_answer(root, deltas, 0, prompts[0], 10)
    for (tokens, finish), prompt, a in zip(got, prompts, adapter_of, strict=True):
        assert finish.reason == "length"
        assert tokens == merged_answer(root, deltas, a, prompt, 10), a
    assert got[0][0] != base  # fr's answer to that prompt is not the base's


def test_the_prompt_cache_never_restores_a_state_across_adapters(adapters):
    root, deltas = adapters
    engine = Engine(served_model(root), max_concurrency=2, ctx=64, snapshot_interval=4)
    prompt = random_ids(1, 11, vocab=VOCAB, seed=5)[0].tolist()
    try:
        runs = [(a, *answers(engine, [Request(prompt, GREEDY, 6, adapter=a)])[0]) for a in (1, 0, 2, 1, 0)]
    finally:
        engine.close()
    cached = [finish.usage.cached_tokens for _, _, finish in runs]
    assert cached == [0, 0, 0, 8, 8]  # states at 4 and 8 kept per adapter; each adapter's first run starts cold
    for a, tokens, _ in runs:
        assert tokens == merged_answer(root, deltas, a, prompt, 6), a


@pytest.fixture(scope="module")
def client(adapters):
    root, _ = adapters
    engine = Engine(served_model(root), max_concurrency=3, ctx=128)
    app = create_app(engine, Tokenizer.from_dir(root / "base"), "tiny")
    with TestClient(app) as client:
        yield client
    engine.close()


def test_the_api_routes_by_model_and_lists_the_adapters(adapters, client):
    root, deltas = adapters
    tokenizer = Tokenizer.from_dir(root / "base")
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    for model, adapter in [("fr", 1), ("de", 2), ("tiny", 0), (None, 0)]:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0} | ({"model": model} if model else {})
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        expected = merged_answer(root, deltas, adapter, ids, 8, tokenizer.eos_token_ids)
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected), model
        assert reply.json()["model"] == (model or "tiny")
    chat = client.post("/v1/chat/completions", json={"model": "de", "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Paris?"}]})  # fmt: skip
    assert chat.status_code == 200 and chat.json()["model"] == "de"
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("fr", "tiny"), ("de", "tiny")]
    missing = client.post("/v1/completions", json={"model": "es", "prompt": "Hi", "max_tokens": 2})
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'fr'" in error["message"]


def test_serve_refuses_an_adapter_that_does_not_fit_at_start_up(adapters, tmp_path, capsys):
    root, _ = adapters
    bad = edited(root, "de", tmp_path / "wide", tensors=other_vocabulary)
    base = str(root / "base")
    cases = [
        (["--lora", f"fr={root / 'fr'}", "--lora", f"wide={bad}"], "adapter wide: trained on a vocabulary of 1000"),
        (["--lora", f"fr={root / 'fr'}", "--lora", f"fr={root / 'de'}"], "the adapter name 'fr' is given twice"),
        (["--served-model-name", "tiny", "--lora", f"tiny={root / 'fr'}"], "'tiny' is the base model's"),
        (["--lora", f"gone={tmp_path / 'nowhere'}"], "adapter gone .*adapter_config.json is missing"),
    ]
    for flags, message in cases:
        assert main(["serve", base, "--port", "1", *flags]) == 1  # stops before it binds
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main(["serve", base, "--lora", "no-path"])
    assert "expected NAME=PATH" in capsys.readouterr().err
