"""The pretraining loop: training forward = inference forward, the documented initialisation, the schedule, loss
falling, atomic checkpoints and exact resume, and an output directory that qwenlite and transformers load."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenlite.cli.main import build_parser
from qwenlite.errors import QwenliteError
from qwenlite.generate import GenerationStats, decode_step, generate_tokens, prefill
from qwenlite.io.checkpoint import load_checkpoint, write_random_checkpoint
from qwenlite.io.load import load_mtp
from qwenlite.model.cache import make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.sample import SamplingParams
from qwenlite.speculative import MTPDraft, Speculation
from qwenlite.train.data import BatchIterator
from qwenlite.train.pretrain import init_weights, latest_checkpoint, lr_at, pretrain, resolve_model_config
from qwenlite.train.tokenizer_train import train_tokenizer

from helpers import max_abs_diff
from train_helpers import model_state, read_log, single_threaded, small_config, small_train_config, write_jsonl_corpus


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(corpus file, tokenizer dir, shared token cache dir)."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_jsonl_corpus(root / "corpus.jsonl", documents=200)
    train_tokenizer([corpus], 320, root / "tok", show_progress=False)
    return corpus, root / "tok", root / "cache"


def run(setup, out, resume=False, stop_at=None, **overrides):
    corpus, tok, cache = setup
    return pretrain(small_config(), [corpus], out, tok, small_train_config(**overrides), resume=resume,
                    cache_dir=cache, stop_at=stop_at)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """8 steps with checkpoints at 4 and 8, run once: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run(setup, out)
    return out


def test_training_forward_matches_cached_inference():
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(small_config())
    init_weights(model, seed=3)
    ids = torch.randint(0, 320, (1, 150))  # crosses the chunk size of the delta rule (64) twice
    train_logits = model(ids)  # as in the training loop: no cache, autograd on
    assert train_logits.requires_grad and train_logits.dtype == torch.float32
    with torch.no_grad():
        cache = make_cache(model.config, max_seq_len=150, dtype=torch.float32)
        cached = [prefill(model, ids[0, :100].tolist(), cache, chunk=37)]
        cached += [decode_step(model, int(t), cache) for t in ids[0, 100:149]]
    # prefill returns the last prompt position; each decode step the next one
    assert max_abs_diff(torch.stack(cached), train_logits[0, 99:149].detach()) <= 1e-4


def test_init_weights_is_the_documented_initialisation(tmp_path):
    config = small_config()
    model = Qwen3_5ForCausalLM(config)
    init_weights(model, seed=5)
    write_random_checkpoint(config, tmp_path, dtype=torch.float32, seed=5)
    written = load_checkpoint(tmp_path, dtype=torch.float32).model.state_dict()
    assert all(torch.equal(t, written[name]) for name, t in model.state_dict().items())
    layer = model.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 0) and torch.all(layer.linear_attn.norm.weight == 1)
    assert torch.all(layer.linear_attn.dt_bias == 1)
    assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = small_train_config(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_loss_falls_on_a_tiny_model(setup, tmp_path):
    result = run(setup, tmp_path / "out", steps=40, warmup=4, eval_every=20, save_every=40, log_every=1)
    log = read_log(tmp_path / "out")
    losses = [r["loss"] for r in log if "loss" in r]
    held = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 40 and losses[0] > 5.0  # about ln(320) at the start
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert held[-1] < held[0] < losses[0] and result.val_loss == held[-1]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in log if "loss" in r)
    assert (tmp_path / "out" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_and_resume_is_exact(setup, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run(setup, out, stop_at=5)  # a time-boxed job: ends after step 5 with a checkpoint
    assert latest_checkpoint(out).name == "step_00000005"
    run(setup, out, resume=True)
    assert_same_run(out, uninterrupted)


def test_killed_run_resumes_from_its_last_checkpoint_exactly(setup, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_next = BatchIterator.next

    def dies_in_step_7(self):
        if self.position == 6 * 4:  # the batch of step 7
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(BatchIterator, "next", dies_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(out).name == "step_00000004"
    run(setup, out, resume=True)  # steps 5 and 6 are done again, their log lines replaced
    assert_same_run(out, uninterrupted)


def test_an_mtp_head_trains_with_the_model_and_drafts_for_it(setup, tmp_path):
    """--mtp: the head's loss on the token after next falls beside the model's, OUT carries it as mtp.* (config
    mtp_num_hidden_layers 1), speculative decoding with it gives plain decoding's greedy tokens, and a stopped run
    resumes bit for bit, the head's weights and moments included."""
    out = tmp_path / "out"
    run(setup, out, steps=30, warmup=3, eval_every=30, save_every=30, log_every=1, mtp=True)
    log = [r for r in read_log(out) if "loss" in r]
    mtp = [r["mtp_loss"] for r in log]
    assert len(mtp) == 30 and sum(mtp[-5:]) / 5 < 0.7 * mtp[0], mtp
    ckpt = load_checkpoint(out, dtype="float32")
    head = load_mtp(out, ckpt.model)
    assert ckpt.config.mtp_num_hidden_layers == 1 and head is not None
    prompt = list(range(5, 25))
    plain = list(generate_tokens(ckpt.model, prompt, SamplingParams(temperature=0), 16))
    stats = GenerationStats()
    speculation = Speculation(MTPDraft(ckpt.model, head), 2)
    assert list(generate_tokens(ckpt.model, prompt, SamplingParams(temperature=0), 16, stats=stats,
                                speculation=speculation)) == plain  # fmt: skip
    assert stats.draft_tokens > 0

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(setup, whole, mtp=True)
    run(setup, resumed, stop_at=5, mtp=True)
    run(setup, resumed, resume=True, mtp=True)
    assert any(k.startswith("mtp.") for k in model_state(whole))
    assert_same_run(resumed, whole)
    with pytest.raises(QwenliteError, match="another model"):  # a run with the head is not continued without it
        run(setup, whole, resume=True, steps=9)


def assert_same_run(out, reference):
    """Bit-for-bit: weights, optimizer moments and the logged loss curve (all but the timings)."""
    mine, theirs = model_state(out), model_state(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a = torch.load(latest_checkpoint(out) / "optimizer.pt", weights_only=True)["state"]
    b = torch.load(latest_checkpoint(reference) / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in b)

    def curve(path):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(path)]

    assert curve(out) == curve(reference)


def test_sigkill_at_any_moment_leaves_a_resumable_run(setup, uninterrupted, tmp_path):
    """A real kill -9 while the run writes a checkpoint every step (so most moments are inside a write)."""
    corpus, tok, cache = setup
    out = tmp_path / "out"
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1)\n"
        "from train_helpers import small_config, small_train_config\n"
        "from qwenlite.train.pretrain import pretrain\n"
        "pretrain(small_config(), [sys.argv[2]], sys.argv[3], sys.argv[4], small_train_config(save_every=1),"
        " cache_dir=sys.argv[5])\n"
    )
    tests_dir = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", script, tests_dir, str(corpus), str(out), str(tok), str(cache)],
                             stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "step_00000003").is_dir() and child.poll() is None:
        assert time.monotonic() < deadline, "the child never reached step 3"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    step = int(latest_checkpoint(out).name.removeprefix("step_"))
    assert 3 <= step < 8
    load_checkpoint(out)  # OUT loads as it stands
    run(setup, out, resume=True)
    assert_same_run(out, uninterrupted)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(setup, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(setup, out, stop_at=4)
    good = model_state(out)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if "step_00000008" in str(path) and str(path).endswith("trainer_state.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(setup, out, resume=True)
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000004"]  # the half-written step 8 is gone, step 4 untouched
    assert all(torch.equal(good[k], v) for k, v in model_state(out).items())  # OUT still the step-4 model
    load_checkpoint(out)  # loadable as it stands
    run(setup, out, resume=True)
    assert_same_run(out, uninterrupted)


def test_existing_run_is_not_overwritten_and_bad_data_loses_nothing(setup, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(QwenliteError, match="already holds a training run .*--resume"):
        run(setup, out)
    corpus, tok, cache = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat."}\n{"text": "the dog.",}\n')
    with pytest.raises(QwenliteError, match=r"bad\.jsonl:2: malformed JSON"):
        pretrain(small_config(), [corpus, bad], out, tok, small_train_config(steps=12), resume=True, cache_dir=cache)
    with pytest.raises(QwenliteError, match="other data or packing"):
        run(setup, out, resume=True, steps=12, seq_len=16)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_output_loads_in_transformers_and_qwenlite_with_the_same_logits(uninterrupted):
    from transformers import AutoModelForCausalLM

    import qwenlite

    hf = AutoModelForCausalLM.from_pretrained(uninterrupted, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3_5ForCausalLM"
    model, tokenizer = qwenlite.load(str(uninterrupted), dtype="float32")
    ids = torch.tensor([tokenizer.encode("the cat sees the dog. the owl eats the fish.") * 6])  # > one chunk
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits.float()
        assert max_abs_diff(model(ids), expected) <= 1e-4
    names = {p.name for p in uninterrupted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "tokenizer_config.json", "train_log.jsonl", "loss_curve.png"} <= names  # fmt: skip
    generation = json.loads((uninterrupted / "generation_config.json").read_text())
    assert tokenizer.token_to_id("<|endoftext|>") in generation["eos_token_id"]
    text = qwenlite.generate(model, tokenizer, tokenizer.encode("the cat"), qwenlite.SamplingParams(temperature=0),
                             max_tokens=8)  # fmt: skip
    assert isinstance(text, str)


def test_preset_vocabulary_follows_the_tokenizer(tmp_path):
    config = resolve_model_config("tiny", 320)
    assert config.vocab_size == 512 and config.hidden_size == 128 and config.mtp_num_hidden_layers == 0
    assert resolve_model_config("tiny", 248077).vocab_size == 248320  # the published padding
    (tmp_path / "config.json").write_text(json.dumps(small_config(vocab_size=300).to_dict()))
    with pytest.raises(QwenliteError, match="smaller than the tokenizer's 320"):
        resolve_model_config(tmp_path / "config.json", 320)
    assert resolve_model_config(tmp_path / "config.json", 290).vocab_size == 300


def test_cli_trains_a_tokenizer_and_pretrains(setup, tmp_path):
    corpus, _, _ = setup
    parser = build_parser()
    # The Hugging Face Trainer's spellings, and pretraining's older ones kept as aliases (used below).
    new = ["--max-steps", "7", "--warmup-steps", "2", "--max-grad-norm", "0.5"]
    old = ["--steps", "7", "--warmup", "2", "--grad-clip", "0.5"]
    head = ["train", "pretrain", "--config", "tiny", "--data", "x", "--out", "y"]
    spelled = [vars(parser.parse_args(head + flags)) for flags in (new, old)]
    assert spelled[0] == spelled[1] and (spelled[0]["steps"], spelled[0]["warmup"], spelled[0]["grad_clip"]) == (
        7,
        2,
        0.5,
    )
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_dict()))

    def main(*argv):
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert main("train", "tokenizer", "--data", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "tok")) == 0
    out = tmp_path / "out"
    common = ["train", "pretrain", "--config", str(tmp_path / "config.json"), "--data", str(corpus), "--out", str(out),
              "--tokenizer", str(tmp_path / "tok"), "--steps", "6", "--batch-size", "2", "--seq-len", "16",
              "--warmup", "1", "--eval-every", "3", "--save-every", "3", "--val-fraction", "0.1"]  # fmt: skip
    assert main(*common, "--stop-at", "3") == 0
    assert main(*common, "--resume") == 0
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert math.isfinite(log[-1]["val_loss"]) and latest_checkpoint(out).name == "step_00000006"
    train_config = json.loads((latest_checkpoint(out) / "train_config.json").read_text())
    assert train_config["seq_len"] == 16 and train_config["batch_size"] == 2
