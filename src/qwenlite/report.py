"""`qwenlite report MODEL --variants bf16,int8,int4,PATH.gguf --text FILE [--tasks ...] --out DIR`: what each
variant of a model is worth on this machine, side by side, to pick one.

Per variant: quality (perplexity and bits per byte over --text; KL(first variant || this one) and top-1 agreement
on the same positions; with --tasks the lm-evaluation-harness metric of each task), size (bytes of the weights in
memory, and of its files on disk where the variant is a file), and speed (`qwenlite bench`: prefill and decode
tokens/s). From those the intelligence-density columns: score per GB and -ln(error rate) per GB, where score is
the mean of the tasks' main metrics (accuracy-like, in [0, 1]) and GB the weights in memory; the second is the
definition of PrismML's Bonsai whitepaper ("intelligence density"), which rewards the last points of accuracy as
they are harder to get. Without --tasks the density columns are left out: perplexity is not a score in [0, 1].

Written to --out: report.json (everything measured), report.md (the table a person reads), and two plots drawn
from report.json, quality against gigabytes and against decode tokens/s, with the Pareto front marked (no other
variant is at least as good and at least as small / fast). Files are written only when every variant is measured.

A variant is a dtype (`bf16`, `fp16`, `fp32`) or a quantization on load (`int8`, `int4`) of MODEL, or another
model reference (a quantized checkpoint directory, a `.gguf` file).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwenlite import bench
from qwenlite.errors import InvalidArgument
from qwenlite.eval import perplexity
from qwenlite.io.files import atomic_write
from qwenlite.io.hub import resolve_model_path
from qwenlite.model.quantized import QUANT_CHOICES

DTYPE_VARIANTS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BONSAI = "PrismML, Bonsai whitepaper: intelligence density = -ln(error rate) / GB"


@dataclass
class Variant:
    name: str  # as given in --variants (a path: its last part)
    model: str  # the model reference it loads
    dtype: str | None = None
    quant: str | None = None


@dataclass
class Measured:
    name: str
    precision: str
    weight_gb: float
    disk_gb: float | None
    perplexity: float
    bits_per_byte: float
    kl_mean: float | None  # against the first variant
    top1_agreement: float | None
    prefill_tok_s: float
    decode_tok_s: float
    tasks: dict[str, float] = field(default_factory=dict)  # task -> its main metric
    score: float | None = None  # mean of the tasks' metrics
    score_per_gb: float | None = None
    density: float | None = None  # -ln(1 - score) / GB
    pareto_size: bool = False
    pareto_speed: bool = False


def parse_variants(model: str, spec: str) -> list[Variant]:
    variants = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        if name in DTYPE_VARIANTS:
            variants.append(Variant(name, model, dtype=DTYPE_VARIANTS[name]))
        elif name in QUANT_CHOICES:
            variants.append(Variant(name, model, quant=name))
        elif Path(name).exists():
            variants.append(Variant(Path(name).name, name))  # a file's name reads better in tables and plots
        else:
            choices = ", ".join([*DTYPE_VARIANTS, *QUANT_CHOICES])
            raise InvalidArgument(f"variant {name!r} is neither {choices} nor an existing checkpoint or .gguf file")
    if not variants:
        raise InvalidArgument("--variants names no variant")
    if len({v.name for v in variants}) != len(variants):
        raise InvalidArgument("--variants names a variant twice")
    return variants


def main_metric(task_results: dict) -> float:
    """A task's headline number: acc_norm, acc or exact_match where present, else its first numeric metric."""
    numeric = {k.split(",")[0]: v for k, v in task_results.items()
               if isinstance(v, int | float) and "stderr" not in k and k != "sample_len"}  # fmt: skip
    for name in ("acc_norm", "acc", "exact_match"):
        if name in numeric:
            return float(numeric[name])
    if not numeric:
        raise InvalidArgument(f"task results without a metric: {sorted(task_results)}")
    return float(next(iter(numeric.values())))


def disk_bytes(model_ref: str) -> int | None:
    path = Path(model_ref)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return None


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, quality) points, lower cost and higher quality better: which no other point dominates."""
    return [not any(c2 <= c and q2 >= q and (c2, q2) != (c, q) for c2, q2 in points) for c, q in points]


def measure(
    model: str, variants: list[Variant], text: str, ctx: int, tasks: list[str], include_path: str | None,
    limit: float | None, prompt: int, decode: int,
) -> list[Measured]:  # fmt: skip
    if tasks:
        from qwenlite.eval import harness  # the harness is heavy: imported only when tasks are asked for
    first = variants[0]
    out = []
    for v in variants:
        print(f"qwenlite report: {v.name} ({len(out) + 1} of {len(variants)})", flush=True)
        base = None if v is first else (first.model, first.dtype, first.quant)
        ppl = perplexity.perplexity(v.model, text, ctx, v.dtype, v.quant, *(base or (None, None, None)))
        speed = bench.bench(v.model, v.quant, v.dtype, prompt, decode, repeat=1)
        scores = {}
        if tasks:
            results = harness.evaluate(v.model, tasks, include_path, limit, quant=v.quant, dtype=v.dtype)
            scores = {t: main_metric(results["results"][t]) for t in tasks}
        disk = disk_bytes(v.model) if v.dtype is None and v.quant is None else None
        d = ppl.divergence
        out.append(Measured(
            name=v.name, precision=speed.precision, weight_gb=speed.weight_bytes / 1e9,
            disk_gb=disk / 1e9 if disk is not None else None, perplexity=ppl.perplexity,
            bits_per_byte=ppl.bits_per_byte, kl_mean=d.kl_mean if d else None,
            top1_agreement=d.top1_agreement if d else None, prefill_tok_s=speed.prefill_tok_s,
            decode_tok_s=speed.decode_tok_s, tasks=scores,
        ))  # fmt: skip
    score_and_mark(out)
    return out


def score_and_mark(rows: list[Measured]) -> None:
    """The density columns (with task scores) and the Pareto fronts: quality is the score, else -perplexity."""
    for r in rows:
        if r.tasks:
            r.score = sum(r.tasks.values()) / len(r.tasks)
            r.score_per_gb = r.score / r.weight_gb
            error = 1.0 - r.score
            r.density = -math.log(error) / r.weight_gb if error > 0 else math.inf
    quality = [r.score if r.score is not None else -r.perplexity for r in rows]
    for r, on in zip(rows, pareto([(r.weight_gb, q) for r, q in zip(rows, quality, strict=True)]), strict=True):
        r.pareto_size = on
    for r, on in zip(rows, pareto([(-r.decode_tok_s, q) for r, q in zip(rows, quality, strict=True)]), strict=True):
        r.pareto_speed = on


def markdown(report: dict) -> str:
    rows = [Measured(**r) for r in report["variants"]]
    tasks = report["tasks"]
    head = ["variant", "precision", "GB (memory)", "GB (disk)", "perplexity", "bits/byte", "KL vs first",
            "top-1 vs first", *tasks, "prefill tok/s", "decode tok/s"]  # fmt: skip
    if tasks:
        head += ["score", "score / GB", "-ln(error) / GB"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name + (" *" if r.pareto_size else ""), r.precision, num(r.weight_gb, ".4g"), num(r.disk_gb, ".4g"),
                 num(r.perplexity, ".4f"), num(r.bits_per_byte, ".4f"), num(r.kl_mean, ".6f"),
                 num(r.top1_agreement, ".2%"), *(num(r.tasks[t], ".4f") for t in tasks),
                 num(r.prefill_tok_s, ".1f"), num(r.decode_tok_s, ".1f")]  # fmt: skip
        if tasks:
            cells += [num(r.score, ".4f"), num(r.score_per_gb, ".3f"), num(r.density, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"# qwenlite report: {report['model']}",
        "",
        f"Machine: {report['machine']}. Text: {report['text']} (windows of {report['ctx']} tokens). Speed: "
        f"`qwenlite bench` with a {report['prompt']}-token prompt and {report['decode']} decode steps, one run.",
        "",
        *lines,
        "",
        "\\* on the Pareto front of quality against memory (nothing else as good and as small). Quality is the task "
        "score" + (" (mean of the tasks' main metrics)" if tasks else "") + (", else perplexity." if not tasks else ".")
        + " KL is KL(first variant || this one) in nats per token, on the text's positions.",
    ]  # fmt: skip
    if tasks:
        notes += ["", f"Intelligence density: {BONSAI}; score / GB beside it. GB are the weights in memory."]
    notes += ["", "![quality against size](quality_vs_size.png) ![quality against speed](quality_vs_speed.png)", ""]
    return "\n".join(notes)


def plot(report: dict, out_dir: Path) -> None:
    """The two plots, from report.json's content alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Measured(**r) for r in report["variants"]]
    scored = all(r.score is not None for r in rows)
    quality = [r.score if scored else r.perplexity for r in rows]
    label = "task score (mean)" if scored else "perplexity (lower is better)"
    for xs, front, xlabel, name in [
        ([r.weight_gb for r in rows], [r.pareto_size for r in rows], "weights in memory (GB)", "quality_vs_size.png"),
        ([r.decode_tok_s for r in rows], [r.pareto_speed for r in rows], "decode tokens/s", "quality_vs_speed.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(xs, quality, color=["tab:red" if f else "tab:blue" for f in front])
        for x, q, r in zip(xs, quality, rows, strict=True):
            ax.annotate(r.name, (x, q), textcoords="offset points", xytext=(4, 4), fontsize=8)
        on = sorted((x, q) for x, q, f in zip(xs, quality, front, strict=True) if f)
        if len(on) > 1:
            ax.plot(*zip(*on, strict=True), color="tab:red", linewidth=1, label="Pareto front")
            ax.legend()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_title(f"{Path(report['model']).name}: {label} against {xlabel.split(' (')[0]}", fontsize=9)
        fig.tight_layout()
        atomic_write(out_dir / name, lambda p, fig=fig: fig.savefig(p, format="png", dpi=120))
        plt.close(fig)


def report(
    model: str, variants: str, text: str, out: str, ctx: int = 512, tasks: list[str] | None = None,
    include_path: str | None = None, limit: float | None = None, prompt: int = 128, decode: int = 32,
) -> dict:  # fmt: skip
    """Measure every variant, then write report.json, report.md and the plots into `out`."""
    from qwenlite.ops.cpu import kernels

    resolve_model_path(model)  # a missing MODEL fails before anything is measured
    parsed = parse_variants(model, variants)
    perplexity.read_text(Path(text))  # a missing or empty text fails before anything is measured too
    rows = measure(model, parsed, text, ctx, tasks or [], include_path, limit, prompt, decode)
    result = {
        "model": model, "machine": f"{kernels.cpu_name()}, {kernels.isa_label()} kernels", "text": str(text),
        "ctx": ctx, "prompt": prompt, "decode": decode, "tasks": tasks or [], "definition": BONSAI,
        "variants": [asdict(r) for r in rows],
    }  # fmt: skip
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    atomic_write(out_dir / "report.md", lambda p: p.write_text(markdown(result)))
    plot(result, out_dir)
    return result
