"""qwenlite against llama.cpp and transformers in one run, at matched precision, on random-weight checkpoints
with the real shapes of Qwen3.5-0.8B, 2B, 4B and 9B (and of other families' models). Run by hand, never in CI (it
takes a while and wants a quiet machine):

    python bench/compare.py --workdir /tmp/qwcmp                         # 0.8b and 2b, bf16 / int8 / int4
    python bench/compare.py --workdir /tmp/qwcmp --models 2b --precisions int4 --threads 2 --repeat 3
    python bench/compare.py --workdir /tmp/qwcmp --models 4b,9b --precisions int8,int4   # 9B: bf16 needs 18 GB
    python bench/compare.py --workdir /tmp/qwcmp-smoke --models tiny --repeat 1 --prompt 32 --decode 8  # smoke
    python bench/compare.py --workdir /tmp/qwcmp --isa avx2,torch    # qwenlite once per kernel instruction set

Precisions are paired as qwenlite bf16 / llama.cpp BF16, qwenlite int8 (one scale per output channel) / Q8_0
(one per 32 weights), qwenlite int4 (one scale per 128 weights) / Q4_0 (one per 32); transformers runs at bf16.
For each (model, precision, engine) it measures prefill tok/s on a `--prompt`-token prompt of random ids, decode
tok/s over `--decode` greedy steps and the peak resident memory; for qwenlite also how close decode gets to the
memory-bandwidth limit (from `qwenlite bench`). Every engine gets the same short warm-up, then the best of
`--repeat` runs counts.

Missing artifacts are made in --workdir and reused on the next run: the checkpoint (`qwenlite init-random`), the
quantized checkpoints (`qwenlite quantize`, so that peak memory reflects the quantized weights) and the GGUF files
(`qwenlite convert --to gguf`, from the bf16 checkpoint). Every measurement runs in its own process, one at a time,
so that memory figures do not mix and the engines never compete for cores. llama.cpp runs under
--llama-python, an interpreter with llama-cpp-python installed (this file re-runs itself there with --engine llama).
llama-cpp-python is a source package that compiles llama.cpp for this CPU (cmake and a C++ compiler, a few
minutes); keep it out of the project's environment:

    python3 -m venv /work/llvenv && CMAKE_ARGS="-DGGML_NATIVE=ON" /work/llvenv/bin/pip install llama-cpp-python

qwenlite runs with the kernels it chooses for this CPU, or once per instruction set named by --isa (QWENLITE_ISA:
avx512, avx2, torch), each a column of its own ("qwenlite avx2"). To compare against llama.cpp's AVX2 build on an
AVX-512 machine, build a second venv with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF" and pass
it as --llama-python.

At the end a markdown table, the raw results and a bar chart go to --out (default: bench/results/<this machine>,
named by CPU, best kernel instruction set and cores, so that each machine's results stay): compare.md,
compare.json (with the CPU's model and SIMD flags), compare.png.
Random weights give the real speed: decode reads every weight once per token whatever its value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

MODELS = {
    "0.8b": "qwen3.5-0.8b",
    "2b": "qwen3.5-2b",
    "4b": "qwen3.5-4b",
    "9b": "qwen3.5-9b",
    "qwen3-0.6b": "qwen3-0.6b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "35b-a3b-4l": "qwen3.5-35b-a3b --layers 4",  # the MoE at its real per-layer shapes, 4 of its 40 layers
    "tiny": "tiny",
}  # --models name -> init-random's preset (and flags)
PRECISIONS = {"bf16": (None, "bf16"), "int8": (8, "q8_0"), "int4": (4, "q4_0")}  # -> (quantize bits, GGUF dtype)
LLAMA_NAMES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
ENGINES = ("qwenlite", "llama.cpp", "transformers")
DEFAULT_LLAMA_PYTHON = "/work/llvenv/bin/python"
WARMUP = (16, 4)  # prompt tokens, decode steps: pages the weights in and builds the kernels, as `qwenlite bench`


def prompt_ids(n: int) -> list[int]:
    """The same random prompt for every engine (ids 1000..100000, fixed seed); only numpy, which both venvs have."""
    import numpy as np

    return np.random.default_rng(0).integers(1000, 100_000, n).tolist()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def best_of(run, prompt: int, decode: int, repeat: int) -> dict:
    """Warm up, time `repeat` runs of run(n_prompt, n_decode) -> (prefill s, decode s), keep the best of each."""
    run(min(prompt, WARMUP[0]), WARMUP[1])
    runs = [run(prompt, decode) for _ in range(repeat)]
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    return {"prefill_tok_s": prompt / prefill_s, "decode_tok_s": decode / decode_s, "peak_rss_bytes": peak_rss()}


# ---------------------------------------------------------------------------------------------
# Engines run in their own process (this file with --engine)


def llama_load_error(path: str) -> str:
    """Why llama.cpp cannot load `path`: load it again verbosely, llama.cpp's log (fd 2) going to a file."""
    import tempfile

    import llama_cpp

    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            llama_cpp.Llama(model_path=path, verbose=True)
        except ValueError:
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    return "; ".join(line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower())


def measure_llama(path: str, prompt: int, decode: int, repeat: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python's eval(): no sampler chain, greedy is an argmax over the last logits."""
    import llama_cpp
    import numpy as np

    n_ctx = max(1024, prompt + decode + 1)
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                              n_ubatch=512, logits_all=False, verbose=False)  # fmt: skip
    except ValueError as e:
        raise RuntimeError(llama_load_error(path) or str(e)) from None
    n_vocab = llm.n_vocab()
    ids = prompt_ids(prompt)

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    def run(n_prompt: int, n_decode: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n_prompt])
        token = greedy()
        t1 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([token])
            token = greedy()
        return t1 - t0, time.perf_counter() - t1

    return {**best_of(run, prompt, decode, repeat), "version": llama_cpp.__version__}


def measure_transformers(path: str, prompt: int, decode: int, repeat: int, threads: int) -> dict:
    """As bench/vs_transformers.py: a forward with logits_to_keep=1 is the prefill; generate() of decode + 1 tokens
    less that prefill is the decode."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt_ids(prompt)])

    def run(n_prompt: int, n_decode: int) -> tuple[float, float]:
        x = ids[:, :n_prompt]
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=n_decode + 1, min_new_tokens=n_decode + 1, do_sample=False)
            total = time.perf_counter() - t1
        return t1 - t0, total - (t1 - t0)

    return {**best_of(run, prompt, decode, repeat), "version": transformers.__version__}


# ---------------------------------------------------------------------------------------------
# Artifacts


def qwenlite_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwenlite.cli", *args]


def make_dir(out: Path, cmd: list[str]) -> None:
    """Run cmd, which writes a directory at its last argument, into OUT.partial, then rename: a directory that
    exists is complete."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([*cmd, str(partial)], check=True)
    partial.rename(out)


def ensure_artifacts(workdir: Path, model: str, precisions: list[str]) -> dict[str, Path]:
    """Make what is missing; return {"checkpoint": dir, "bf16": dir, "int8": dir, ..., "gguf-bf16": file, ...}.
    The bf16 checkpoint is made only when something is missing that comes from it (delete it once the quantized
    checkpoints and GGUF files exist, and a 9B's int4 comparison needs 11 GB of disk instead of 29)."""
    root = workdir / model
    ckpt = root / "bf16"
    paths = {"checkpoint": ckpt}

    def source() -> Path:
        if not ckpt.exists():
            print(f"[artifact] {model}: random {MODELS[model]} checkpoint -> {ckpt}", flush=True)
            make_dir(ckpt, qwenlite_cli("init-random", *MODELS[model].split()))
        return ckpt

    for precision in precisions:
        bits, gguf_dtype = PRECISIONS[precision]
        paths[precision] = source() if bits is None else root / precision
        if not paths[precision].exists():
            print(f"[artifact] {model}: {precision} checkpoint -> {paths[precision]}", flush=True)
            make_dir(paths[precision], qwenlite_cli("quantize", "--bits", str(bits), str(source())))
        gguf = paths[f"gguf-{precision}"] = root / f"{model}-{gguf_dtype}.gguf"
        if not gguf.exists():
            print(f"[artifact] {model}: GGUF {gguf_dtype} -> {gguf}", flush=True)
            subprocess.run(qwenlite_cli("convert", str(source()), "--to", "gguf", str(gguf), "--dtype", gguf_dtype),
                           check=True)  # fmt: skip
    return paths


# ---------------------------------------------------------------------------------------------
# Measuring


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    """Run a measurement; its last stdout line is a JSON object. On failure: {"error": what it said last}."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        try:
            return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t}
        except json.JSONDecodeError:
            pass
    said = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    if proc.stderr.strip():
        print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-15:]), file=sys.stderr)
    if proc.returncode < 0:
        said.append(f"killed by {signal.Signals(-proc.returncode).name}")
    return {"error": said[-1] if said else f"exit status {proc.returncode}"}


def other_runnable() -> int:
    """Tasks other than this one that want a core right now (the fewest over half a second): another busy process
    skews every figure, llama.cpp's most, whose threads spin at each barrier and stall when one is preempted."""
    counts = []
    for _ in range(5):
        with open("/proc/stat") as f:
            counts.append(next(int(line.split()[1]) for line in f if line.startswith("procs_running")))
        time.sleep(0.1)
    return min(counts) - 1


def measure(a: argparse.Namespace, model: str, precision: str, engine: str, paths: dict[str, Path]) -> dict:
    busy = other_runnable()
    if busy:
        print(f"  warning: {busy} other runnable task(s) on this machine; the figures will suffer", flush=True)
    sizes = ["--prompt", str(a.prompt), "--decode", str(a.decode), "--repeat", str(a.repeat),
             "--threads", str(a.threads)]  # fmt: skip
    if engine.startswith("qwenlite"):
        path = paths[precision]
        isa = engine.partition(" ")[2]
        env = {**os.environ, "QWENLITE_ISA": isa} if isa else None
        r = run_json(qwenlite_cli("bench", str(path), *sizes, "--json"), env)
    elif engine == "llama.cpp":
        path = paths[f"gguf-{precision}"]
        r = run_json([a.llama_python, __file__, "--engine", "llama", "--path", str(path), *sizes])
    else:
        path = paths["checkpoint"]
        r = run_json([sys.executable, __file__, "--engine", "transformers", "--path", str(path), *sizes])
    r = {k: v for k, v in r.items() if k not in ("model", "precision")}  # qwenlite bench's: the path, the dtype
    return {"model": model, "precision": precision, "engine": engine, "path": str(path), **r,
            "other_runnable_before": busy}  # fmt: skip


def _pairs_reversed(plan: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """The plan grouped by (model, precision), each group's engines in reverse order."""
    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for x in plan:
        groups.setdefault(x[:2], []).append(x)
    return [g[::-1] for g in groups.values()]


def better(old: dict | None, new: dict) -> dict:
    """Two measurements of one (model, precision, engine) as one: the higher prefill and decode rates, the lower
    peak memory, the rest from the faster decode; an error only if both failed."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    keep = dict(new if new["decode_tok_s"] > old["decode_tok_s"] else old)
    keep["prefill_tok_s"] = max(old["prefill_tok_s"], new["prefill_tok_s"])
    keep["decode_tok_s"] = max(old["decode_tok_s"], new["decode_tok_s"])
    keep["peak_rss_bytes"] = min(old["peak_rss_bytes"], new["peak_rss_bytes"])
    return keep


def result_line(r: dict) -> str:
    head = f"{r['model']:>5} {r['precision']:<5} {r['engine']:<13}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    line = (f"{head} prefill {r['prefill_tok_s']:9.1f} tok/s   decode {r['decode_tok_s']:8.1f} tok/s   "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB")  # fmt: skip
    if "limit_ratio" in r:
        line += f"   decode/limit {r['limit_ratio']:.0%} of {r['decode_limit_tok_s']:.1f} tok/s"
    return line


# ---------------------------------------------------------------------------------------------
# Reporting


def find(results: list[dict], model: str, precision: str, engine: str) -> dict | None:
    for r in results:
        if (r["model"], r["precision"], r["engine"]) == (model, precision, engine) and "error" not in r:
            return r
    return None


def ratio(r: dict | None, base: dict | None, key: str) -> str:
    return f"{r[key] / base[key]:.2f}x" if r and base else "-"


def table(results: list[dict]) -> str:
    rows = ["| model | precision | engine | prefill tok/s | decode tok/s | peak RSS GiB "
            "| vs llama.cpp (prefill, decode) | decode/limit |", "|---|---|---|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in results:
        name = r["engine"] + (f" {LLAMA_NAMES[r['precision']]}" if r["engine"] == "llama.cpp" else "")
        head = f"| {r['model']} | {r['precision']} | {name} |"
        if "error" in r:
            rows.append(f"{head} error: {r['error'].replace('|', '/')} | | | | |")
            continue
        llama = find(results, r["model"], r["precision"], "llama.cpp")
        vs = f"{ratio(r, llama, 'prefill_tok_s')}, {ratio(r, llama, 'decode_tok_s')}"
        vs = "" if r["engine"] == "llama.cpp" else vs
        limit = f"{r['limit_ratio']:.0%} of {r['decode_limit_tok_s']:.0f}" if "limit_ratio" in r else ""
        rows.append(f"{head} {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                    f"{r['peak_rss_bytes'] / 2**30:.2f} | {vs} | {limit} |")  # fmt: skip
    return "\n".join(rows)


def engines_in(results: list[dict]) -> list[str]:
    """The engines measured, in the plan's order (one "qwenlite ISA" column per --isa value)."""
    return list(dict.fromkeys(r["engine"] for r in results))


def summary(results: list[dict], models: list[str], precisions: list[str]) -> str:
    lines = []
    for q_engine in (e for e in engines_in(results) if e.startswith("qwenlite")):
        lines.append(f"{q_engine} / llama.cpp (prefill, decode):")
        for model in models:
            for precision in precisions:
                q, ll = find(results, model, precision, q_engine), find(results, model, precision, "llama.cpp")
                lines.append(f"  {model} {precision} vs {LLAMA_NAMES[precision]}: "
                             f"{ratio(q, ll, 'prefill_tok_s')}, {ratio(q, ll, 'decode_tok_s')}")  # fmt: skip
        if "bf16" in precisions and any(r["engine"] == "transformers" for r in results):
            lines.append(f"{q_engine} / transformers, bf16 (prefill, decode):")
            for model in models:
                q, t = find(results, model, "bf16", q_engine), find(results, model, "bf16", "transformers")
                lines.append(f"  {model}: {ratio(q, t, 'prefill_tok_s')}, {ratio(q, t, 'decode_tok_s')}")
    return "\n".join(lines)


def bar_text(results: list[dict], model: str, precision: str, engine: str, key: str) -> str:
    r = find(results, model, precision, engine)
    if r:
        return f"{r[key]:.1f}"
    ran = any((r["model"], r["precision"], r["engine"]) == (model, precision, engine) for r in results)
    return "error" if ran else ""


def plot(results: list[dict], models: list[str], precisions: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m, p) for m in models for p in precisions]
    engines = engines_in(results)
    blues = iter(["tab:blue", "tab:cyan", "tab:purple", "navy"])
    colors = {e: next(blues) if e.startswith("qwenlite") else {"llama.cpp": "tab:orange"}.get(e, "tab:green")
              for e in engines}  # fmt: skip
    width = 0.8 / len(engines)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.9 * len(groups) + 2), 9))
    for ax, key, label in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode tok/s", "prefill tok/s"), strict=True):
        for i, engine in enumerate(engines):
            xs = [g + (i - (len(engines) - 1) / 2) * width for g in range(len(groups))]
            found = [find(results, m, p, engine) for m, p in groups]
            bars = ax.bar(xs, [r[key] if r else 0.0 for r in found], width, color=colors[engine], label=engine)
            ax.bar_label(bars, [bar_text(results, m, p, engine, key) for m, p in groups], fontsize=7, padding=2)
            if not engine.startswith("qwenlite") or key != "decode_tok_s":
                continue
            for x, r in zip(xs, found, strict=True):  # the bandwidth limit: a dashed cap over each qwenlite bar
                if r and "decode_limit_tok_s" in r:
                    y = r["decode_limit_tok_s"]
                    ax.hlines(y, x - width / 2, x + width / 2, colors="black", linestyles="--")
                    # Left of the dash, clear of the bar's own value label above it.
                    ax.annotate(f"limit {y:.0f}", (x - width / 2, y), textcoords="offset points", xytext=(-2, 0),
                                ha="right", va="center", fontsize=7)  # fmt: skip
        if key == "decode_tok_s":
            ax.plot([], [], "k--", label="qwenlite decode limit (memory bandwidth)")
        ax.set_xticks(range(len(groups)), [f"{m} {p}" for m, p in groups])
        ax.set_ylabel(label)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.12)  # room for the labels
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.97), ncol=4,
               fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def machine() -> dict:
    """The CPU (model name, SIMD flags, the kernels qwenlite would choose), the cores, Python, the commit, and a slug
    naming this machine's results folder."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from qwenlite.ops.cpu import kernels

    cpu, flags = kernels._cpuinfo()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "asimd", "sve", "i8mm", "bf16")))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    best = kernels.runnable_isas()[0]
    slug = "-".join([*"".join(c if c.isalnum() else " " for c in cpu.lower()).split(), best, f"{os.cpu_count()}c"])
    return {"cpu": cpu, "simd_flags": simd, "kernels": best, "cores": os.cpu_count(),
            "python": platform.python_version(), "qwenlite_commit": commit, "slug": slug}  # fmt: skip


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where checkpoints and GGUF files are made and reused")
    p.add_argument("--models", default="0.8b,2b", help=f"comma-separated, of {', '.join(MODELS)} (default 0.8b,2b)")
    p.add_argument("--precisions", default="bf16,int8,int4", help="comma-separated (default bf16,int8,int4)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after a warm-up; the best counts (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="passes over all runs, the engines' order alternating; "
                   "each figure is the best of all passes (default 2)")  # fmt: skip
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode", type=int, default=128, help="decode steps (default 128)")
    p.add_argument("--skip-transformers", action="store_true", help="measure qwenlite and llama.cpp only")
    p.add_argument("--isa", help="comma-separated QWENLITE_ISA values to measure qwenlite with, each a column "
                   "(default: the kernels qwenlite chooses here)")  # fmt: skip
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON if os.path.exists(DEFAULT_LLAMA_PYTHON)
                   else sys.executable, help="a Python with llama-cpp-python (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", help="output folder (default: bench/results/<this machine>)")
    p.add_argument("--engine", choices=["llama", "transformers"], help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--path", help=argparse.SUPPRESS)  # internal: the GGUF or checkpoint it measures
    a = p.parse_args()
    if a.engine:
        fn = measure_llama if a.engine == "llama" else measure_transformers
        print(json.dumps(fn(a.path, a.prompt, a.decode, a.repeat, a.threads)))
        return
    if not a.workdir:
        p.error("--workdir is required")
    models, precisions = a.models.split(","), a.precisions.split(",")
    for name, known in ((models, MODELS), (precisions, PRECISIONS)):
        if unknown := [x for x in name if x not in known]:
            p.error(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    for name in ("threads", "repeat", "rounds", "prompt", "decode"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")

    info = machine()
    workdir, out = Path(a.workdir), Path(a.out or Path(__file__).parent / "results" / info["slug"])
    paths = {model: ensure_artifacts(workdir, model, precisions) for model in models}

    qwenlites = [f"qwenlite {isa}" for isa in a.isa.split(",")] if a.isa else ["qwenlite"]
    plan = [(m, p, e) for m in models for p in precisions for e in (*qwenlites, "llama.cpp")]
    if not a.skip_transformers and "bf16" in precisions:
        plan += [(m, "bf16", "transformers") for m in models]
    order = [*qwenlites, *ENGINES[1:]]
    plan.sort(key=lambda x: (models.index(x[0]), precisions.index(x[1]), order.index(x[2])))
    settings = f"{a.threads} threads, prompt {a.prompt}, decode {a.decode}, best of {a.repeat} x {a.rounds} rounds"
    print(f"[measure] {len(plan)} runs x {a.rounds} rounds, one at a time; {settings}", flush=True)
    best: dict[tuple[str, str, str], dict] = {}
    for round_ in range(a.rounds):
        # This machine's memory bandwidth drifts by 2x over minutes (shared host): alternating which engine of a
        # pair goes first, and keeping the best of every round, gives each engine the same chances.
        order = plan if round_ % 2 == 0 else [x for pair in _pairs_reversed(plan) for x in pair]
        for model, precision, engine in order:
            r = measure(a, model, precision, engine, paths[model])
            print(f"[round {round_ + 1}] " + result_line(r), flush=True)
            best[(model, precision, engine)] = better(best.get((model, precision, engine)), r)
    results = [best[k] for k in plan]

    title = f"qwenlite vs llama.cpp vs transformers: {info['cpu']}, {settings}"
    md = "\n\n".join([f"# {title}", table(results), "```\n" + summary(results, models, precisions) + "\n```"])
    print("\n" + table(results) + "\n\n" + summary(results, models, precisions))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md + "\n")
    meta = {**info, "date": datetime.now(UTC).isoformat(timespec="seconds"), "threads": a.threads,
            "prompt": a.prompt, "decode": a.decode, "repeat": a.repeat, "rounds": a.rounds,
            "llama_python": a.llama_python}  # fmt: skip
    (out / "compare.json").write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    plot(results, models, precisions, title, out / "compare.png")
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


if __name__ == "__main__":
    main()
