"""The command line end to end on a checkpoint the test writes: `init-random`, `run`, `chat`, and the
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenlite
from qwenlite.cli import main
from qwenlite.cli import run as cli_run
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer

from helpers import console_script, qwen36_style_template, scripted_checkpoint, tiny_checkpoint

END_THINK = 248069  # </think> in the Qwen3.5 vocabulary


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["init-random", "tiny", str(out), "--dtype", "float32", "--seed", "1"]) == 0
    return out


def run_cli(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_random_writes_a_full_checkpoint(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert expected <= names
    assert "generation_config.json" in names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["vocab_size"] == 248320
    assert not any(n.endswith(".tmp") for n in names)


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory) -> Path:
    """helpers.tiny_checkpoint: a model whose greedy answer depends on the whole prompt (tiny_dir's repeats its
    last input token, and a chat prompt's last tokens are the template's)."""
    return tiny_checkpoint(tmp_path_factory)


@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_run_prints_only_the_answer(lively_dir, capsys, monkeypatch, raw):
    """stdout is the answer and a newline, nothing else; the model saw exactly the prompt's ids (chat-templated, or
    the plain text with --raw), and the answer is generate's on them, different for two prompts."""
    model, tok = qwenlite.load(str(lively_dir))
    seen, stream = [], cli_run.stream
    monkeypatch.setattr(cli_run, "stream", lambda m, t, ids, *a: seen.append(list(ids)) or stream(m, t, ids, *a))
    answers = set()
    for prompt in ("Once upon a time", "Name three colours"):
        flags = ["--raw"] if raw else []
        code, out, err = run_cli(
            capsys, "run", str(lively_dir), prompt, *flags, "--max-tokens", "12", "--temperature", "0"
        )
        assert code == 0
        ids = tok.encode(prompt if raw else tok.apply_chat_template([{"role": "user", "content": prompt}]))
        assert seen.pop() == ids
        expected = qwenlite.generate(model, tok, ids, SamplingParams(temperature=0), max_tokens=12)
        assert out == expected + "\n" and expected.strip()
        assert "tok/s" not in out and "tok/s" not in err  # stats only with --verbose
        answers.add(expected)
    assert len(answers) == 2


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory) -> Path:
    """A model that thinks "Let me think", closes the block and answers "Paris" after a prompt ending in a line break
    (the thinking template's "<think>\\n"), and answers "Paris" at once after a blank line (the end of the empty block
    the template writes when thinking is off)."""
    return scripted_checkpoint(tmp_path_factory.mktemp("scripted"), ["\n", "Let me think", END_THINK, "\n\n", "Paris"])


def test_run_think_sends_the_reasoning_to_stderr(scripted_dir, capsys):
    """README: "One answer, streamed to stdout (only the answer; reasoning goes to stderr)"."""
    argv = ["run", str(scripted_dir), "Capital of France?", "--temperature", "0", "--max-tokens", "20"]
    code, out, err = run_cli(capsys, *argv, "--think")
    assert (code, out) == (0, "Paris\n")
    assert err == "Let me think\n"  # the reasoning, then a line break before the answer starts
    code, out, err = run_cli(capsys, *argv, "--no-think")
    assert (code, out, err) == (0, "Paris\n", "")


def test_run_raw_prints_the_continuation_exactly(tmp_path_factory, capsys):
    """A raw prompt opens no chat channel: the continuation's leading blank line is printed (then the line break
    `run` ends with), as the decoded tokens say."""
    scripted = scripted_checkpoint(tmp_path_factory.mktemp("raw"), ["Once", "\n\n", "upon"])
    capsys.readouterr()  # what building the checkpoint printed
    argv = ["run", str(scripted), "Once", "--raw", "--temperature", "0", "--max-tokens", "10"]
    assert run_cli(capsys, *argv) == (0, "\n\nupon\n", "")


def test_run_verbose_reports_timings_on_stderr(tiny_dir, capsys):
    code, out, err = run_cli(
        capsys, "run", str(tiny_dir), "Hi", "--max-tokens", "4", "--temperature", "0", "--no-think", "--verbose"
    )
    assert code == 0
    assert "tok/s" in err and "time to first token" in err
    assert "tok/s" not in out


def test_run_passes_the_newer_template_variables(tiny_dir, tmp_path, capsys):
    """--reasoning-effort, --preserve-thinking and --chat-template-kwargs reach a checkpoint's template (a
    Qwen3.6-style one here, which writes the effort into the prompt): the prompt grows by exactly those tokens."""
    d = copy_checkpoint(tiny_dir, tmp_path / "newer")
    (d / "chat_template.jinja").write_text(qwen36_style_template())
    tok = Tokenizer.from_dir(d)
    messages = [{"role": "user", "content": "Hi"}]
    for flags, kwargs in [([], {}), (["--reasoning-effort", "low"], {"reasoning_effort": "low"}),
                          (["--chat-template-kwargs", '{"reasoning_effort": "medium", "preserve_thinking": true}'],
                           {"reasoning_effort": "medium"})]:  # fmt: skip
        code, _, err = run_cli(capsys, "run", str(d), "Hi", "--max-tokens", "1", "--verbose", "--no-think", *flags)
        n = len(tok.encode_chat(messages, enable_thinking=False, **kwargs))
        assert code == 0 and f"prompt {n} tok" in err, (flags, n, err)
    _expect_error(capsys, "run", str(d), "Hi", "--reasoning-effort", "max", needle="reasoning_effort must be")
    _expect_error(capsys, "run", str(d), "Hi", "--chat-template-kwargs", '{"tools": []}', needle="cannot set tools")


def test_run_seeded_sampling_is_reproducible(tiny_dir, capsys):
    argv = [
        "run",
        str(tiny_dir),
        "Tell me a story",
        "--raw",
        "--max-tokens",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        "7",
    ]
    first = run_cli(capsys, *argv)
    second = run_cli(capsys, *argv)
    assert first[0] == 0 and first == second


def test_chat_two_turns_over_piped_stdin(tiny_dir, capsys, monkeypatch):
    code, out, err = run_cli(
        capsys,
        "chat",
        str(tiny_dir),
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--no-think",
        "--verbose",
        stdin="Hello\nAnd again?\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert len(stats) == 2, err
    # The second turn's prompt holds the whole first exchange, so it is longer.
    first, second = (int(line.split()[1]) for line in stats)
    assert second > first + 5


def test_chat_commands(tiny_dir, capsys, monkeypatch):
    stdin = "Hello\n/reset\nHello\n/think\n/exit\nnever read\n"
    code, out, err = run_cli(
        capsys,
        "chat",
        str(tiny_dir),
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--no-think",
        "--verbose",
        stdin=stdin,
        monkeypatch=monkeypatch,
    )
    assert code == 0
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert len(stats) == 2
    assert stats[0].split()[1] == stats[1].split()[1]  # after /reset the same prompt again
    assert "(new conversation)" in err and "(reasoning on)" in err


def _expect_error(capsys, *argv: str, needle: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenlite: error:"), err
    assert needle in lines[0], lines[0]
    return lines[0]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_directory(capsys, tmp_path):
    _expect_error(capsys, "run", str(tmp_path / "nope"), "hi", needle="no such model directory")


@pytest.mark.parametrize(
    ("command", "device", "needle"),
    [("run", "tpu", "unknown device 'tpu'"), ("run", "mps", "'mps' is not supported"),
     ("bench", "cuda:99", "device 'cuda:99':"), ("serve", "cuda:x", "unknown device 'cuda:x'")],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_one_line(tiny_dir, capsys, command, device, needle):
    """Checked before loading; cuda:99 fails on a CPU-only torch (no GPU) and on a GPU machine (no GPU 99) alike."""
    args = [str(tiny_dir), "hi"] if command == "run" else [str(tiny_dir)]
    _expect_error(capsys, command, *args, "--device", device, needle=needle)


def test_missing_config(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "config.json").unlink()
    _expect_error(capsys, "run", str(d), "hi", needle="config.json")


def test_missing_tokenizer(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "tokenizer.json").unlink()
    _expect_error(capsys, "run", str(d), "hi", needle="tokenizer.json")


def test_missing_weights(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").unlink()
    _expect_error(capsys, "run", str(d), "hi", needle="safetensors")


def test_truncated_weights(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    _expect_error(capsys, "run", str(d), "hi", needle="model.safetensors")


def test_unknown_model_type(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    line = _expect_error(capsys, "run", str(d), "hi", needle="llama")
    assert "qwen3_5" in line


def test_wrong_tensor_shape(tiny_dir, tmp_path, capsys):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, d / "model.safetensors")
    _expect_error(capsys, "run", str(d), "hi", needle=name)


def test_prompt_longer_than_context(tiny_dir, capsys):
    _expect_error(capsys, "run", str(tiny_dir), "word " * 50, "--raw", "--ctx", "16", needle="longer than the context")


def test_bad_sampling_flag(tiny_dir, capsys):
    _expect_error(capsys, "run", str(tiny_dir), "hi", "--top-p", "1.5", needle="top_p")


def test_hub_id_without_network(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = _expect_error(capsys, "run", "Qwen/Qwen3.5-0.8B", "hi", needle="Qwen/Qwen3.5-0.8B")
    assert "network" in line and "local checkpoint directory" in line


def test_console_script_end_to_end(tiny_dir):
    """The installed entry point, in a fresh process: answer on stdout, exit 0; bad input exits 1."""
    exe = console_script()
    ok = subprocess.run(
        [exe, "run", str(tiny_dir), "Hi", "--max-tokens", "3", "--temperature", "0", "--raw"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([exe, "run", str(tiny_dir / "missing"), "Hi"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_dir):
    """SIGINT during an answer ends that answer only; the chat then reads the next line."""
    exe = console_script()
    argv = [exe, "chat", str(tiny_dir), "--max-tokens", "100000", "--temperature", "1", "--seed", "0"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Tell me everything\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/reset\n/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    # The session read the next line after the stop: /reset answered (EOF alone would also exit 0).
    assert b"(stopped)" in err and b"(new conversation)" in err.partition(b"(stopped)")[2]
