"""`qwenlite bench MODEL [--quant int8|int4]`: how fast a model runs on this machine, and how close decode gets
to what the memory bandwidth allows.

At batch 1 a decode step reads every weight once (the embedding only one row; of a mixture-of-experts layer, the
router's top-k experts and the shared expert), so its ceiling is the machine's memory bandwidth divided by the bytes
read per token. The bench measures that bandwidth itself (a parallel read
of the model's largest tensor, far larger than the caches, before and after the timed runs), then prefill of a
`--prompt`-token prompt (time to first token included), `--decode` greedy decode steps, and the peak resident
memory: best of `--repeat` runs after a warm-up that pages the weights in. The prompt is random token ids; random
weights give the real speed.

With `--speculate K` it also decodes speculatively (`--draft mtp|ngram`) and prints the acceptance rate, the mean
accepted length (tokens per verification forward) and what a verification forward of K+1 tokens costs against
one decode token for K = 1..4, and with the MTP head what one draft costs, choosing among all ids and among the
first 64K and 32K (where the context's tokens keep to them: speculative.MTPDraft): with acceptance a the expected
speed-up is (1 - a^(K+1)) / ((1 - a) (cost + K draft)). Random weights draft at random: their acceptance says
nothing of a trained model's, and their random prompt and output keep the drafts among all ids.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class BenchResult:
    model: str
    precision: str
    threads: int
    kernels: str  # qwenlite's CPU kernels that ran ("avx512", "avx2", "avx2+avx_vnni", "neon+asimddp", "torch", ...)
    weight_bytes: int  # every tensor of the model, once
    bytes_per_token: int  # what one decode step reads: all of it but an untied embedding and the experts not chosen
    active_expert_bytes_per_token: int  # of which the experts a token runs (top-k routed + shared; 0: no MoE)
    load_seconds: float
    prompt_tokens: int
    prefill_tok_s: float
    time_to_first_token_s: float
    decode_tokens: int
    decode_tok_s: float
    bandwidth_gb_s: float
    decode_limit_tok_s: float
    peak_rss_bytes: int
    rss_before_load_bytes: int
    device: str = "cpu"
    peak_device_bytes: int = 0  # a GPU's peak allocated memory (0 on the CPU)
    speculate: int = 0  # --speculate K (0: the fields below are not measured)
    draft: str = ""
    speculative_decode_tok_s: float = 0.0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    verify_cost: dict[int, float] = field(default_factory=dict)  # K -> a forward of K+1 tokens / one decode token
    draft_cost: dict[int, float] = field(default_factory=dict)  # draft vocabulary -> one MTP draft / one decode token
    default_speculate: int = 0  # what `run` and `chat` now do without --speculate (recorded: speculative.py)
    vocab_size: int = 0

    @property
    def limit_ratio(self) -> float:
        return self.decode_tok_s / self.decode_limit_tok_s

    def to_dict(self) -> dict:
        return {**asdict(self), "limit_ratio": self.limit_ratio}

    def table(self) -> str:
        gb, gib = 1e9, 2**30
        rss_ratio = self.peak_rss_bytes / self.weight_bytes
        added_ratio = (self.peak_rss_bytes - self.rss_before_load_bytes) / self.weight_bytes
        rows = [
            ("weights", f"{self.weight_bytes / gb:.2f} GB ({self.bytes_per_token / gb:.2f} GB read per decode token)"),
            *([("active experts", f"{self.active_expert_bytes_per_token / gb:.3f} GB read per decode token "
                                    "(routed top-k + shared)")] if self.active_expert_bytes_per_token else []),
            ("load", f"{self.load_seconds:.1f} s"),
            (f"prefill ({self.prompt_tokens} tok)", f"{self.prefill_tok_s:.1f} tok/s"),
            ("time to first token", f"{self.time_to_first_token_s * 1000:.0f} ms"),
            (f"decode ({self.decode_tokens} tok)", f"{self.decode_tok_s:.1f} tok/s"),
            ("memory bandwidth", f"{self.bandwidth_gb_s:.1f} GB/s -> decode limit {self.decode_limit_tok_s:.1f} tok/s"),
            ("decode / limit", f"{self.limit_ratio:.0%}"),
            ("peak resident memory", f"{self.peak_rss_bytes / gib:.2f} GiB ({rss_ratio:.2f}x the weights)"),
            ("  of which the model", f"{added_ratio:.2f}x the weights (Python and torch: "
                                     f"{self.rss_before_load_bytes / gib:.2f} GiB before loading)"),
        ]  # fmt: skip
        if self.device != "cpu":
            peak, ratio = self.peak_device_bytes / gib, self.peak_device_bytes / self.weight_bytes
            rows.append((f"peak {self.device} memory", f"{peak:.2f} GiB ({ratio:.2f}x the weights)"))
        if self.speculate:
            speedup = self.speculative_decode_tok_s / self.decode_tok_s
            costs = ", ".join(f"K={k} {c:.2f}x" for k, c in sorted(self.verify_cost.items()))

            def ids(v: int) -> str:
                return "all ids" if v == self.vocab_size else f"first {v // 1024}K ids" if v % 1024 == 0 else \
                    f"first {v} ids"  # fmt: skip

            drafts = ", ".join(f"{ids(v)} {c:.2f}x" for v, c in sorted(self.draft_cost.items(), reverse=True))
            rows += [
                (f"speculative (K={self.speculate}, {self.draft})",
                 f"{self.speculative_decode_tok_s:.1f} tok/s ({speedup:.2f}x plain decode)"),
                ("  acceptance", f"{self.acceptance_rate:.0%} of drafts, mean accepted length "
                                 f"{self.mean_accepted_length:.2f} tok per verification"),
                ("  verify K+1 / decode 1", costs),
                *([("  MTP draft / decode 1", drafts)] if drafts else []),
                ("  run / chat default", f"--speculate {self.default_speculate} --draft {self.draft}"
                 if self.default_speculate else "off (slower than plain decoding here)"),
            ]  # fmt: skip
        where = f"{self.kernels} kernels" if self.device == "cpu" else self.device
        title = f"qwenlite bench {self.model} ({self.precision}, {self.threads} threads, {where})"
        return "\n".join([title, *(f"  {k:<22} {v}" for k, v in rows)])


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for a GPU's queued work, so that a timer reads when it finished, not when it was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(model: torch.nn.Module, repeat: int = 5, least_seconds: float = 0.05) -> float:
    """Bytes per second of a parallel read of the model's largest weight tensor (the head or the embedding,
    far larger than any cache: no extra memory), best of `repeat` reads, or of as many as `least_seconds` takes:
    a tiny model's read lasts microseconds, and one of a few can land on a core another process holds."""
    from qwenlite.ops.cpu import kernels

    largest = max((t for t in [*model.parameters(), *model.buffers()]), key=lambda t: t.nbytes)
    raw = largest.detach().reshape(-1).view(torch.uint8)
    buf = raw[: raw.numel() // 256 * 256].view(torch.float32)  # any bits: only the time to read them counts
    read = kernels.read_memory if kernels.available() and buf.device.type == "cpu" else torch.sum
    best, n, start = float("inf"), 0, time.perf_counter()
    while n < repeat or time.perf_counter() - start < least_seconds:
        synchronize(buf.device)
        t = time.perf_counter()
        read(buf)
        synchronize(buf.device)
        best, n = min(best, time.perf_counter() - t), n + 1
    return buf.nbytes / best


def weight_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes of all tensors counted once, bytes one decode step reads, of which its active experts). A MoE layer's
    token reads top_k of its equally sized routed experts, and the shared expert."""
    from qwenlite.model.qwen3_5 import SparseMoeBlock

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])

    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    total = sum(seen.values())
    head_storages = {t.untyped_storage().data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    embed = model.model.embed_tokens
    untied = sum(seen.get(p, 0) for p in {t.untyped_storage().data_ptr() for t in [*embed.parameters(),
                                                                                     *embed.buffers()]}
                 if p not in head_storages)  # fmt: skip
    routed = chosen = shared = 0
    for moe in (m for m in model.modules() if isinstance(m, SparseMoeBlock)):
        experts = nbytes(moe.experts)
        routed += experts
        chosen += experts * moe.top_k // len(moe.experts)
        shared += nbytes(moe.shared_expert)
    return total, total - untied - routed + chosen, chosen + shared


def best_time(step: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` runs of `step`, after one to warm up (buffers, plans)."""
    step()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def speculation_costs(model: torch.nn.Module, ids: list[int], draft=None, ks: range = range(1, 5),
                      repeat: int = 5) -> tuple[dict[int, float], dict[int, float]]:  # fmt: skip
    """Over one decode step's time, both after the prompt `ids`: K -> a verification forward of K+1 tokens
    (speculative.verify_forward, and the rewind to one), what speculation pays per pass over the weights; and with
    an MTP `draft`, draft vocabulary -> one step of its head (MTPDraft.step over one position) choosing among all
    ids and among the first speculative.DRAFT_VOCABS. Best of `repeat`; the states are not restored between runs
    (values do not change the time)."""
    from qwenlite.generate import decode_step, prefill
    from qwenlite.model.cache import make_cache
    from qwenlite.speculative import DRAFT_VOCABS, verify_forward

    vocab = model.config.vocab_size
    cache = make_cache(model.config, max_seq_len=len(ids) + max(ks) + 1, dtype=model.dtype, device=model.device)

    def one() -> None:
        decode_step(model, ids[-1], cache)
        cache.lengths -= 1

    def verify(k: int) -> None:
        verify_forward(model, ids[-k - 1 :], cache)
        cache.rewind(k + 1, 1)
        cache.lengths -= 1

    def drafted(v: int) -> None:
        draft.cache.lengths.fill_(len(ids) - 1)
        draft.step(token, hidden, v)

    with torch.inference_mode():
        prefill(model, ids, cache)
        base = best_time(one, repeat)
        verifies = {k: best_time(lambda k=k: verify(k), repeat) / base for k in ks}
        if draft is None:
            return verifies, {}
        draft.begin(len(ids) + 2)
        token = torch.tensor([[ids[-1]]], device=model.device)
        hidden = torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype, device=model.device)
        vocabs = (vocab, *(v for v in DRAFT_VOCABS if v < vocab))
        return verifies, {v: best_time(lambda v=v: drafted(v), repeat) / base for v in vocabs}


def bench(model_ref: str, quant: str | None = None, dtype: str | None = None, prompt: int = 512, decode: int = 128,
          repeat: int = 3, threads: int | None = None, device: str = "cpu", speculate: int = 0,
          draft: str = "mtp") -> BenchResult:  # fmt: skip
    from qwenlite.generate import GenerationStats, decode_step, generate_tokens, prefill
    from qwenlite.io.hub import resolve_model_path
    from qwenlite.io.load import load_model
    from qwenlite.model.cache import make_cache
    from qwenlite.ops.cpu import kernels
    from qwenlite.sample import SamplingParams, greedy
    from qwenlite.speculative import decision_key, make_speculation, record_decision

    if threads:
        torch.set_num_threads(threads)
    rss_before = current_rss()
    t = time.perf_counter()
    path = resolve_model_path(model_ref)
    model, _ = load_model(path, dtype, quant, device, with_tokenizer=False)
    where = model.device
    synchronize(where)
    load_seconds = time.perf_counter() - t
    speculation = make_speculation(path, model, speculate, draft)
    total, per_token, active_experts = weight_bytes(model)
    vocab = model.config.vocab_size  # ids past the control tokens, or any id of a tiny vocabulary
    ids = torch.randint(1000 if vocab > 2000 else 0, min(100_000, vocab), (prompt,),
                        generator=torch.Generator().manual_seed(0)).tolist()  # fmt: skip

    def run(n_prompt: int, n_decode: int) -> tuple[float, float]:
        cache = make_cache(model.config, max_seq_len=n_prompt + n_decode + 1, dtype=model.dtype, device=model.device)
        with torch.inference_mode():
            synchronize(where)
            t0 = time.perf_counter()
            token = greedy(prefill(model, ids[:n_prompt], cache))  # greedy's .item() waits for the GPU
            t1 = time.perf_counter()
            for _ in range(n_decode):
                token = greedy(decode_step(model, token, cache))
            return t1 - t0, time.perf_counter() - t1

    run(min(prompt, 16), 4)  # warm-up: page the weights in, build the kernels
    # A shared machine's bandwidth drifts: probe it on both sides of the timed runs, keep the higher.
    before = measure_bandwidth(model)
    runs = [run(prompt, decode) for _ in range(repeat)]
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    bandwidth = max(before, measure_bandwidth(model))
    spec: dict = {}
    if speculation is not None:
        runs = []
        for _ in range(repeat):
            stats = GenerationStats()
            # decode + 1 tokens: the first comes from prefill, as in `run` above
            for _ in generate_tokens(model, ids, SamplingParams(temperature=0), decode + 1, stats=stats,
                                     speculation=speculation):  # fmt: skip
                pass
            runs.append(stats)
        fastest = min(runs, key=lambda s: s.decode_seconds)
        speculative_tok_s = decode / fastest.decode_seconds
        # The default of `run` and `chat` for this model here: on if faster than plain decoding
        record = record_decision(decision_key(path, quant, dtype, where.type), speculate, draft,
                                 speculative_tok_s / (decode / decode_s))  # fmt: skip
        costs = speculation_costs(model, ids, speculation.draft if draft == "mtp" else None, repeat=max(repeat, 5))
        spec = dict(speculate=speculate, draft=draft, speculative_decode_tok_s=speculative_tok_s,
                    acceptance_rate=fastest.acceptance_rate, mean_accepted_length=fastest.mean_accepted_length,
                    verify_cost=costs[0], draft_cost=costs[1],
                    default_speculate=record["speculate"])  # fmt: skip
    bits = getattr(model.lm_head, "bits", None)  # a QuantLinear head: quantized on load or a quantized checkpoint
    precision = f"int{bits}" if bits else str(model.dtype).removeprefix("torch.")
    return BenchResult(
        model=model_ref, precision=precision, threads=torch.get_num_threads(), kernels=kernels.isa_label(),
        weight_bytes=total, bytes_per_token=per_token, active_expert_bytes_per_token=active_experts,
        load_seconds=load_seconds, prompt_tokens=prompt,
        prefill_tok_s=prompt / prefill_s, time_to_first_token_s=prefill_s, decode_tokens=decode,
        decode_tok_s=decode / decode_s, bandwidth_gb_s=bandwidth / 1e9, decode_limit_tok_s=bandwidth / per_token,
        peak_rss_bytes=peak_rss(), rss_before_load_bytes=rss_before, device=str(where),
        peak_device_bytes=torch.cuda.max_memory_allocated(where) if where.type == "cuda" else 0,
        vocab_size=model.config.vocab_size, **spec,
    )  # fmt: skip
