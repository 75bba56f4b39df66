"""Serving speed through the HTTP server, which runs in its own process as `qwenlite serve` would:

- aggregate decode tokens/s with 1, 4 and 8 concurrent streams (tokens received by all streams while all of
  them are decoding, over that window);
- time to first token of a second chat turn after a long first turn, with prompt-state reuse (the snapshot
  where turn 1's answer starts is restored) and without (the same-length prompt, cold).

`--speculate K --draft mtp|ngram` serves with speculative decoding and prints /metrics' tokens per verification;
`--repeat N` sends each decode stream its prompt N times over (prompt lookup finds matches), `--trials N` keeps the
best of N decode runs, `--decode-only` skips the second-turn measurement.

Run by hand, e.g. on a random-weight checkpoint (speed does not depend on weight values):

    qwenlite init-random qwen3.5-0.8b /tmp/q08
    python bench/serve.py /tmp/q08 --threads 2
    python bench/serve.py /tmp/q08 --threads 2 --repeat 4 --trials 3 --decode-only --speculate 3 --draft ngram
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

SERVER = """
import sys, torch
torch.set_num_threads({threads})
from qwenlite.serve.app import serve
serve({path!r}, port={port}, max_concurrency={slots}, ctx={ctx}, dtype={dtype!r}, served_model_name="bench",
      speculate={speculate}, draft={draft!r})
"""


def start_server(
    path: str, threads: int, slots: int, ctx: int, dtype: str | None, speculate: int = 0, draft: str = "mtp"
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = SERVER.format(threads=threads, path=path, port=port, slots=slots, ctx=ctx, dtype=dtype,
                         speculate=speculate, draft=draft)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 300:
            raise RuntimeError("the server did not start:\n" + proc.stderr.read().decode())
        time.sleep(0.2)


def stream_times(url: str, path: str, body: dict) -> list[float]:
    """POST a streaming request; the arrival time of each data chunk."""
    times = []
    with httpx.Client(timeout=600) as client, client.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


def decode_throughput(url: str, streams: int, tokens: int, repeat: int = 1) -> tuple[float, float]:
    """-> (aggregate tokens/s while all streams decode, mean per-stream tokens/s). /v1/completions streams one
    chunk per token (several chunks at once where a speculative step keeps drafts)."""
    results: list[list[float]] = [[] for _ in range(streams)]

    def run(i: int) -> None:
        body = {"model": "bench", "prompt": f"Stream {i}: once upon a time" * repeat, "max_tokens": tokens,
                "temperature": 0, "stream": True}  # fmt: skip
        results[i] = stream_times(url, "/v1/completions", body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(r[0] for r in results)  # every stream has its first token
    end = min(r[-1] for r in results)  # none has finished
    inside = sum(1 for r in results for t in r if start < t <= end)
    per_stream = statistics.mean((len(r) - 1) / (r[-1] - r[0]) for r in results)
    return inside / (end - start), per_stream


WORDS = (
    "the river runs past old stone walls where people walk slowly in the evening light and talk about "
    "their day while birds fly over green fields near a small town with houses shops and a market square"
).split()


def second_turn_ttft(url: str, first_turn_words: int, seed: int, warm: bool) -> tuple[float, int, int]:
    """Turn 1 (a long user message), then turn 2; -> (turn-2 time to first token, cached tokens, prompt tokens).
    Cold: turn 2's first word differs from turn 1's, so no stored prefix matches (same length)."""
    long_text = " ".join(WORDS[(seed * 7919 + i * 31) % len(WORDS)] for i in range(first_turn_words))
    turn1 = [{"role": "user", "content": long_text}]
    r = httpx.post(url + "/v1/chat/completions", timeout=600,
                   json={"model": "bench", "messages": turn1, "max_tokens": 16, "temperature": 0}).json()  # fmt: skip
    answer = r["choices"][0]["message"]["content"]
    first = long_text if warm else "X" + long_text
    turn2 = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Summarise that in one line."}]  # fmt: skip
    body = {"model": "bench", "messages": turn2, "max_tokens": 2, "temperature": 0, "stream": True,
            "logprobs": True, "stream_options": {"include_usage": True}}  # fmt: skip
    usage = {}
    t0 = time.perf_counter()
    first_token = None
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as s:
        for line in s.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first_token is None and chunk["choices"] and chunk["choices"][0].get("logprobs"):
                first_token = time.perf_counter() - t0  # every token's chunk carries its logprob
            usage = chunk.get("usage") or usage
    return first_token, usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="weight dtype (default: checkpoint's)")
    p.add_argument("--decode", type=int, default=48, help="tokens per stream")
    p.add_argument("--first-turn", type=int, default=2000, help="words in turn 1 (about one token each)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speculate", type=int, default=0, metavar="K", help="serve with speculative decoding")
    p.add_argument("--draft", default="mtp", choices=["mtp", "ngram"])
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="each decode prompt N times over")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8], help="concurrent decode streams to measure")
    p.add_argument("--decode-only", action="store_true", help="skip the second-turn time to first token")
    p.add_argument("--trials", type=int, default=1, help="decode runs per stream count; the best is printed (on a "
                   "shared machine the least disturbed)")  # fmt: skip
    a = p.parse_args()

    proc, url = start_server(a.model, a.threads, 8, 8192, a.dtype, a.speculate, a.draft)
    try:
        decode_throughput(url, 1, 8)  # warm-up
        print(f"{a.model}: {a.threads} threads, {a.decode} tokens per stream, prompt x{a.repeat}"
              + (f", speculating {a.speculate} ({a.draft})" if a.speculate else ""))  # fmt: skip
        for n in a.streams:
            aggregate, per_stream = max(decode_throughput(url, n, a.decode, a.repeat) for _ in range(a.trials))
            print(f"  {n} stream(s): aggregate decode {aggregate:6.1f} tok/s, per stream {per_stream:5.1f} tok/s")
        if a.speculate:
            metrics = httpx.get(url + "/metrics").text
            per = next(line for line in metrics.splitlines() if line.startswith("qwenlite_speculative_tokens_per_"))
            print(f"  tokens per verification (all streams, warm-up included): {float(per.split()[-1]):.2f}")
        for warm in () if a.decode_only else (True, False):
            runs = [second_turn_ttft(url, a.first_turn, seed, warm) for seed in range(a.repeats)]
            ttft = statistics.median(r[0] for r in runs)
            cached, prompt = runs[-1][1], runs[-1][2]
            label = "with prompt-state reuse   " if warm else "without (cold prefill)    "
            print(f"  second turn, {label}: time to first token {ttft * 1000:7.0f} ms "
                  f"(prompt {prompt} tokens, {cached} cached)")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
