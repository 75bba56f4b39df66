"""Speculative decoding with the MTP head: llama.cpp's (`--spec-type draft-mtp`) against qwenlite's (`--speculate K`)
on the same GGUF, which `qwenlite convert --to gguf` writes with the head as llama.cpp's nextn tail block. Greedy, the
same prompts and number of generated tokens, the same threads, one run: each engine plain and with K = 1..3 drafts.
Run by hand, never in CI (it wants llama.cpp's command-line tools, which the pip package does not build):

    # llama.cpp's source as llama-cpp-python ships it (or a git checkout of ggml-org/llama.cpp with draft-mtp)
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/llsrc
    tar xzf /tmp/llsrc/llama_cpp_python-0.3.36.tar.gz -C /tmp/llsrc
    cmake -S /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llsrc/build -G Ninja \\
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF
    nice cmake --build /tmp/llsrc/build --target llama-completion llama-speculative-simple -j2   # ~45 min on 2 cores

    qwenlite train demo --quick --out /tmp/demo          # a tiny model whose MTP head is trained with it
    python bench/spec_llamacpp.py --llama-bin /tmp/llsrc/build/bin --model demo:f32:/tmp/demo/model --check-drafts
    python bench/spec_llamacpp.py --llama-bin /tmp/llsrc/build/bin --model 0.8b:q8_0:/tmp/qwcmp/0.8b/bf16 --tokens 32

`--model LABEL:DTYPE:CHECKPOINT` exports CHECKPOINT to --workdir/LABEL-DTYPE.gguf (reused when there). A checkpoint
without `mtp.*` (a random-weight one of `qwenlite init-random`) first gets a random head, the documented
initialisation, in a copy of the directory made of links and one more safetensors file: its drafts are nearly always
rejected, which shows what a rejected draft costs. Both engines load the GGUF: llama.cpp's F32 / Q8_0 / BF16 beside
qwenlite's fp32 / int8 (quantized on load, one scale per output channel) / bf16.

llama.cpp plain is llama-completion (its "eval time", decode steps after the prompt), with MTP llama-speculative-simple
(its "decoded ... t/s", from the prompt's last token; n_drafted, n_accept: every draft is K long at p-min 0, as
qwenlite's); both with --ignore-eos. qwenlite runs in this process (generate_tokens, its GenerationStats; no stop id).
Each figure is the total over the prompts of each one's fastest of --repeat passes; a pass runs, prompt by prompt,
every configuration one after the other (on a shared machine the load then drifts alike for all). "same" counts the
prompts whose generated text equals that engine's plain decoding's, and a line under the table the prompts where the
two engines' plain texts agree. Greedy speculation should change nothing, but for near-ties: a verification forward
of K + 1 rows rounds differently from a decode step, and a random-weight model's logits (bf16 in qwenlite: steps of
1/64 near 2) tie often enough to split there; two engines' weights (Q8_0 against per-channel int8) differ more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

import torch  # noqa: E402

PRECISIONS = {"f32": ("float32", None), "bf16": ("bfloat16", None), "q8_0": ("bfloat16", "int8"),
              "q4_0": ("bfloat16", "int4")}  # GGUF dtype -> qwenlite's (dtype, quant) of the same file  # fmt: skip
PROMPTS = ('def is_prime(n):\n    """', "import os\n\n\ndef ", 'class Stack:\n    """A ')  # train/demo.py's


@dataclass
class Run:
    """One configuration's totals over the prompts in one pass."""

    tokens: int = 0  # generated tokens the timing covers
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    verifies: int = 0  # forwards of the model that verified drafts
    texts: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Artifacts


def has_head(checkpoint: Path) -> bool:
    from qwenlite.io.checkpoint import checkpoint_files

    return any(name.startswith("mtp.") for name in checkpoint_files(checkpoint))


def with_random_head(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` when it has an MTP head; else `out`: links to its files, a random head (the documented
    initialisation, seed 0, the checkpoint's dtype) in mtp.safetensors, the shard index extended when there is one."""
    from safetensors.torch import save_file

    from qwenlite.config import DTYPES, load_config
    from qwenlite.io.checkpoint import INDEX_FILE
    from qwenlite.io.files import atomic_write
    from qwenlite.model.mtp import MTP, PREFIX
    from qwenlite.model.qwen3_5 import initial_value

    if has_head(checkpoint):
        return checkpoint
    if (out / "mtp.safetensors").is_file():
        return out
    config = load_config(checkpoint)
    with torch.device("meta"):
        shapes = {PREFIX + name: tuple(t.shape) for name, t in MTP(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES.get(config.dtype, torch.bfloat16)
    head = {n: initial_value(n, s, gen, config.zero_centred_norms).to(dtype) for n, s in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name != INDEX_FILE and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    if (checkpoint / INDEX_FILE).is_file():
        index = json.loads((checkpoint / INDEX_FILE).read_text())
        index["weight_map"] |= dict.fromkeys(head, "mtp.safetensors")
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    atomic_write(out / "mtp.safetensors", lambda p: save_file(head, str(p)))
    return out


def gguf_for(label: str, dtype: str, checkpoint: Path, workdir: Path) -> tuple[Path, bool]:
    """(the GGUF of `checkpoint` at `dtype`, whether its head is random), made in `workdir` unless there."""
    from qwenlite.io.gguf_export import export_gguf

    random_head = not has_head(checkpoint)
    path = workdir / f"{label}-{dtype}.gguf"
    if not path.is_file():
        source = with_random_head(checkpoint, workdir / f"{label}-with-head")
        print(f"exporting {source} -> {path}", file=sys.stderr)
        export_gguf(source, path, dtype)
    return path, random_head


# ---------------------------------------------------------------------------------------------
# llama.cpp, one process a run


def number(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"no {what} in llama.cpp's output:\n{text[-3000:]}")
    return float(m.group(1))


def llama(cmd: list[str], last_line: str) -> tuple[str, str]:
    """(stdout, stderr) of a run whose stderr has `last_line` (a pattern): llama.cpp's logger, a thread, now and then
    loses the end of the output at exit (1 run in 3 here), and such a run is repeated."""
    for _ in range(5):
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        if re.search(last_line, done.stderr):
            return done.stdout, done.stderr
    raise SystemExit(f"{' '.join(cmd)}: no {last_line!r} in 5 runs:\n{done.stderr[-3000:]}")


def llama_common(gguf: Path, prompt: str, tokens: int, threads: int) -> list[str]:
    return ["-m", str(gguf), "-p", prompt, "-n", str(tokens), "--temp", "0", "--top-k", "1", "-t", str(threads),
            "-tb", str(threads), "-c", "1024", "--ignore-eos", "-s", "0"]  # fmt: skip


def llama_plain(bin_dir: Path, gguf: Path, prompt: str, tokens: int, threads: int, run: Run) -> None:
    out, err = llama([str(bin_dir / "llama-completion"), *llama_common(gguf, prompt, tokens, threads), "-no-cnv",
                      "--no-display-prompt"], "graphs reused")  # fmt: skip
    ms = number(r"common_perf_print:\s+eval time =\s*([\d.]+) ms", err, "eval time")  # not "prompt eval time"
    runs = int(number(r"common_perf_print:\s+eval time =\s*[\d.]+ ms /\s*(\d+) runs", err, "eval runs"))
    run.tokens, run.seconds = run.tokens + runs, run.seconds + ms / 1000
    run.texts.append(out)


def llama_mtp(bin_dir: Path, gguf: Path, prompt: str, tokens: int, threads: int, k: int, run: Run) -> None:
    mtp = ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(k), "--spec-draft-p-min", "0"]
    out, err = llama([str(bin_dir / "llama-speculative-simple"), *llama_common(gguf, prompt, tokens, threads), *mtp],
                     "graphs reused")  # fmt: skip
    if "checkpoints" in err:  # partial acceptance would re-run the target, and n_accept would count it twice
        raise SystemExit("llama-speculative-simple fell back to checkpoints; its counts would not be comparable")
    both = out + err
    n = int(number(r"decoded\s+(\d+) tokens", both, "decoded tokens"))
    seconds = number(r"decoded\s+\d+ tokens in\s+([\d.]+) seconds", both, "decode time")
    drafted = int(number(r"n_drafted\s*=\s*(\d+)", both, "n_drafted"))
    accepted = int(number(r"n_accept\s*=\s*(\d+)", both, "n_accept"))
    run.tokens, run.seconds, run.drafted = run.tokens + n, run.seconds + seconds, run.drafted + drafted
    run.accepted, run.verifies = run.accepted + accepted, run.verifies + n - accepted  # a verify: one kept by the model
    text = out.removeprefix("\n\n")  # the prompt, then the generated text
    run.texts.append(text[len(prompt) :] if text.startswith(prompt) else text)


# ---------------------------------------------------------------------------------------------
# qwenlite, in this process


def qwenlite_run(model, tokenizer, speculation, prompt: str, tokens: int, run: Run) -> None:
    from qwenlite.generate import GenerationStats, generate_tokens
    from qwenlite.sample import SamplingParams

    stats = GenerationStats()
    with torch.inference_mode():
        out = list(generate_tokens(model, tokenizer.encode(prompt), SamplingParams(temperature=0), tokens,
                                   stats=stats, speculation=speculation))  # fmt: skip
    run.tokens, run.seconds = run.tokens + stats.generated_tokens - 1, run.seconds + stats.decode_seconds
    run.drafted, run.accepted = run.drafted + stats.draft_tokens, run.accepted + stats.accepted_tokens
    run.verifies += stats.verify_steps
    run.texts.append(tokenizer.decode(out))


# ---------------------------------------------------------------------------------------------


def measure(label: str, gguf: Path, dtype: str, args: argparse.Namespace) -> dict[tuple[str, int], Run]:
    from qwenlite.io.load import load_model
    from qwenlite.speculative import make_speculation

    qdtype, quant = PRECISIONS[dtype]
    model, tokenizer = load_model(gguf, qdtype, quant)
    speculations = {k: make_speculation(gguf, model, k) for k in [0, *args.ks]}
    for spec in speculations.values():  # warm-up: kernels built, weights paged in
        qwenlite_run(model, tokenizer, spec, args.prompts[0], 8, Run())
    llama_plain(args.llama_bin, gguf, args.prompts[0], 8, args.threads, Run())
    best: dict[tuple[str, int, int], Run] = {}  # (engine, K, prompt) -> its fastest run
    for p in range(args.repeat):
        for i, prompt in enumerate(args.prompts):
            for engine in ("llama.cpp", "qwenlite"):
                for k in [0, *args.ks]:
                    run = Run()
                    if engine == "qwenlite":
                        qwenlite_run(model, tokenizer, speculations[k], prompt, args.tokens, run)
                    elif k == 0:
                        llama_plain(args.llama_bin, gguf, prompt, args.tokens, args.threads, run)
                    else:
                        llama_mtp(args.llama_bin, gguf, prompt, args.tokens, args.threads, k, run)
                    if (engine, k, i) not in best or run.tok_s > best[engine, k, i].tok_s:
                        best[engine, k, i] = run
            print(f"{label}: pass {p + 1}, prompt {i + 1} done", file=sys.stderr, flush=True)
    return {(engine, k): total([best[engine, k, i] for i in range(len(args.prompts))])
            for engine in ("llama.cpp", "qwenlite") for k in [0, *args.ks]}  # fmt: skip


def total(runs: list[Run]) -> Run:
    sums = [sum(getattr(r, f) for r in runs) for f in ("tokens", "seconds", "drafted", "accepted", "verifies")]
    return Run(*sums, texts=[t for r in runs for t in r.texts])


def check_drafts(bin_dir: Path, gguf: Path, dtype: str, prompt: str, tokens: int, threads: int) -> list[str]:
    """llama.cpp's MTP drafts against qwenlite's head, one by one: llama-speculative-simple with K = 1 logs each
    draft's top-3 candidates and their probabilities (its draft sampler's top-10 softmax); qwenlite's head runs over
    the whole greedy sequence at once (with K = 1 every draft comes from the model's own hidden states, so the head's
    cache holds what a teacher-forced pass computes). llama.cpp's head also has, at position 0, the first prompt
    token paired with a zero hidden state (common/speculative.cpp: pending_h starts at zeros), which qwenlite's, as
    vLLM's, leaves out: compared both with and without that row."""
    from qwenlite.generate import generate_tokens
    from qwenlite.io.load import load_model, load_mtp
    from qwenlite.sample import SamplingParams

    _, err = llama([str(bin_dir / "llama-speculative-simple"), *llama_common(gguf, prompt, tokens, threads),
                    "--spec-type", "draft-mtp", "--spec-draft-n-max", "1", "--spec-draft-p-min", "0", "-lv", "5"],
                   "graphs reused")  # fmt: skip
    drafts, candidates = [], []  # (H: tokens before the last one, [(token, p) best first])
    for line in err.splitlines():
        if m := re.search(r"draft candidate\s+\d+, pos\s+0:\s+(\d+) \(\s*([\d.]+)\)", line):
            candidates.append((int(m.group(1)), float(m.group(2))))
        elif m := re.search(r"hist size = (\d+)", line):
            drafts.append((int(m.group(1)), candidates))
            candidates = []
    qdtype, quant = PRECISIONS[dtype]
    model, tokenizer = load_model(gguf, qdtype, quant)
    head = load_mtp(gguf, model)
    ids = tokenizer.encode(prompt)
    with torch.inference_mode():
        seq = torch.tensor([ids + list(generate_tokens(model, ids, SamplingParams(temperature=0), tokens + 8))])
        h = model.model(seq)
        # row t: (h_t, token t+1) -> token t + 2; with llama.cpp's zero row first, the same rows one further on
        plain = model.lm_head(head(model, seq[:, 1:], h[:, :-1]))[0].float()
        zero_row = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        sentinel = model.lm_head(head(model, seq, zero_row))[0, 1:].float()
    lines = []
    for name, logits in (("without", plain), ("with", sentinel)):
        same, worst = 0, 0.0
        for H, cands in drafts:  # the draft after token H comes from row H - 1
            top = logits[H - 1].topk(10)
            p = dict(zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist(), strict=True))
            same += cands[0][0] == top.indices[0].item()
            worst = max([worst, *(abs(p.get(t, 0.0) - q) for t, q in cands)])
        lines.append(f"- {name} llama.cpp's zero row: {same} of {len(drafts)} first-step drafts the same token, "
                     f"largest difference of a top-3 candidate's probability {worst:.4f} (llama.cpp prints 3 "
                     "decimals)")  # fmt: skip
    return [f"Drafts one by one (K = 1, {prompt!r}, {tokens} tokens), llama.cpp's against qwenlite's head:", *lines]


def same_text(text: str, reference: str) -> bool:
    """Whether `text` starts with `reference` (llama-speculative-simple generates a few tokens more than -n, and
    llama.cpp's tools end their output with newlines of their own)."""
    return text.startswith(reference.rstrip())


def table(label: str, dtype: str, random_head: bool, best: dict[tuple[str, int], Run], ks: list[int]) -> list[str]:
    llama_plain_tok_s = best["llama.cpp", 0].tok_s
    head = "random MTP head" if random_head else "MTP head trained with the model"
    lines = [f"### {label}, {dtype} GGUF ({head})", "",
             "| engine | K | decode tok/s | x its plain | x llama.cpp plain | accepted / drafted | acceptance "
             "| mean accepted length | same text as its plain |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for engine in ("llama.cpp", "qwenlite"):
        plain = best[engine, 0]
        for k in [0, *ks]:
            r = best[engine, k]
            counts = f"{r.accepted} / {r.drafted}" if r.drafted else "-"
            accept = f"{r.accepted / r.drafted:.1%}" if r.drafted else "-"
            length = f"{(r.accepted + r.verifies) / r.verifies:.2f}" if r.verifies else "-"
            same = sum(same_text(a, b) for a, b in zip(r.texts, plain.texts, strict=True))
            lines.append(f"| {engine} | {k or 'plain'} | {r.tok_s:.1f} | {r.tok_s / plain.tok_s:.2f} | "
                         f"{r.tok_s / llama_plain_tok_s:.2f} | {counts} | {accept} | {length} | "
                         f"{same}/{len(plain.texts)} |")  # fmt: skip
    both = zip(best["llama.cpp", 0].texts, best["qwenlite", 0].texts, strict=True)
    agree = sum(same_text(a, b) for a, b in both)
    return [*lines, "", f"llama.cpp plain and qwenlite plain generate the same text for {agree} of "
            f"{len(best['qwenlite', 0].texts)} prompts."]  # fmt: skip


def machine() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", lscpu)
    flags = set((re.search(r"Flags:\s*(.+)", lscpu) or re.search("()", "")).group(1).split())
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "avx512", "bf16", "vnni")))
    commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return [f"- CPU: {name.group(1).strip() if name else platform.processor()}, {os.cpu_count()} cores; SIMD flags: "
            f"{' '.join(simd)}", f"- qwenlite commit: {commit[:110]}"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin", type=Path, required=True, help="the folder of llama-completion and "
                   "llama-speculative-simple (see above how to build them)")  # fmt: skip
    p.add_argument("--model", action="append", required=True, metavar="LABEL:DTYPE:CHECKPOINT",
                   help=f"a checkpoint directory to export at DTYPE ({', '.join(PRECISIONS)}); repeatable")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spec-llamacpp"), help="GGUF files and head copies")
    p.add_argument("--ks", default="1,2,3", help="draft lengths (default 1,2,3)")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--prompt", dest="prompts", action="append", help="a prompt, repeatable (default: 3 code starts)")
    p.add_argument("--threads", type=int, default=2, help="threads of both engines (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="passes over every run; the fastest counts (default 3)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    p.add_argument("--check-drafts", action="store_true", help="also compare llama.cpp's MTP drafts with qwenlite's "
                   "head one by one, on the first prompt (see check_drafts)")  # fmt: skip
    args = p.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    args.prompts = args.prompts or list(PROMPTS)
    for tool in ("llama-completion", "llama-speculative-simple"):
        if not (args.llama_bin / tool).is_file():
            raise SystemExit(f"no {tool} in {args.llama_bin}: build it (see this file's docstring)")
    models = []
    for spec in args.model:
        label, dtype, checkpoint = spec.split(":", 2)
        if dtype not in PRECISIONS:
            raise SystemExit(f"--model {spec}: DTYPE must be one of {', '.join(PRECISIONS)}")
        models.append((label, dtype, Path(checkpoint)))
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    lines = ["# Speculative decoding with the MTP head: llama.cpp draft-mtp against qwenlite --speculate", "",
             *machine(), f"- {args.threads} threads, greedy, {args.tokens} tokens generated for each of "
             f"{len(args.prompts)} prompts, best of {args.repeat} passes", "- command: `python "
             + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`", ""]  # fmt: skip
    for label, dtype, checkpoint in models:
        gguf, random_head = gguf_for(label, dtype, checkpoint, args.workdir)
        started = time.perf_counter()
        best = measure(label, gguf, dtype, args)
        lines += [*table(label, dtype, random_head, best, args.ks), "",
                  f"({time.perf_counter() - started:.0f} s)", ""]  # fmt: skip
        if args.check_drafts:
            lines += [*check_drafts(args.llama_bin, gguf, dtype, args.prompts[0], args.tokens, args.threads), ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
