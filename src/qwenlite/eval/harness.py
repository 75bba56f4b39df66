"""`qwenlite eval MODEL --tasks T1,T2`: lm-evaluation-harness tasks and metrics, scored by qwenlite's own model.

The harness owns the tasks (its registry, or local YAML under `--include-path`), the prompts, few-shot sampling,
the metrics and the results JSON; `QwenliteLM` answers its three kinds of request:
- loglikelihood (multiple choice and friends): requests are grouped by context; each context is prefilled once,
  its state copied into up to `batch_size` rows, and that many continuations scored in one forward, right-padded
  (a row's padding comes after its last scored position, and the rows are dropped after) (the harness's `hf`
  backend runs context + continuation again for every choice);
- loglikelihood_rolling (perplexity tasks): the harness's own disjoint windows of `max_length` tokens;
- generate_until: greedy decoding through `generate_tokens`, stopped at the end-of-turn ids, at `max_gen_toks`, or
  once a stop string appears; the text is cut at the first stop string, as the harness's backends cut it.
What a request is scored on follows the `hf` backend exactly (tokenization without special tokens, the trailing
spaces of a context moved to its continuation, left truncation to `max_length` + 1 tokens, the end-of-text token
as the context of an empty one), so that both give the same metrics for the same model (tests/test_eval.py).
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from qwenlite.errors import InvalidArgument, QwenliteError
from qwenlite.generate import generate_tokens, prefill
from qwenlite.io.files import atomic_write
from qwenlite.io.hub import resolve_model_path
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import run_model
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import ENDOFTEXT, Tokenizer

try:
    from lm_eval import simple_evaluate, utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table  # noqa: F401 - the CLI prints results with the harness's table
except ImportError:  # pragma: no cover - the message is the point
    raise QwenliteError("qwenlite eval needs lm-evaluation-harness: pip install 'qwenlite[eval]'") from None


class QwenliteLM(TemplateLM):
    """A loaded qwenlite model as a harness model. `think`: the chat template's enable_thinking when the harness
    applies it (`--apply-chat-template`); None leaves the template's default."""

    def __init__(
        self,
        model: Qwen3_5ForCausalLM,
        tokenizer: Tokenizer,
        max_length: int | None = None,
        think: bool | None = None,
        batch_size: int = 8,
    ):
        super().__init__()
        if batch_size < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {batch_size}")
        self.model, self.qtokenizer, self.think, self.batch_size = model, tokenizer, think, batch_size
        context = model.config.max_position_embeddings
        self.max_length = min(max_length or context, context)
        eot = tokenizer.special_tokens.get("eos_token") or ENDOFTEXT
        self._eot = tokenizer.token_to_id(eot)
        if self._eot is None:
            raise QwenliteError(f"the tokenizer has no id for its end-of-text token {eot!r}")

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "qwenlite"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.qtokenizer.encode(string)  # Qwen has no BOS: nothing to add

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.qtokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        kwargs = {} if self.think is None else {"enable_thinking": self.think}
        return self.qtokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, **kwargs)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Per request ((context, continuation) strings, context ids, continuation ids): (sum of ln p of the
        continuation's tokens, whether greedy decoding would have produced them)."""
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        parts = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise InvalidArgument("a loglikelihood request with an empty continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]  # the hf backend's left truncation
            if len(whole) <= len(continuation):
                raise InvalidArgument(f"a continuation of {len(continuation)} tokens leaves no context in max_length "
                                      f"{self.max_length}")  # fmt: skip
            context = tuple(whole[: len(whole) - len(continuation)])
            by_context[context].append(i)
            parts.append(continuation)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        device = self.model.device
        for context, members in tqdm(by_context.items(), desc="loglikelihood", unit="context", disable=disable_tqdm):
            longest = max(len(parts[i]) for i in members)
            rows = min(len(members), self.batch_size)
            cache = make_cache(self.model.config, rows, len(context) + longest, self.model.dtype, device)
            first = torch.log_softmax(prefill(self.model, list(context), cache.rows(0, 1)).float(), -1)
            state = cache.rows(0, 1).snapshot() if longest > 1 else None
            for a in range(0, len(members), rows):
                batch = members[a : a + rows]
                logps = [first[None]] * len(batch)
                width = max(len(parts[i]) for i in batch) - 1
                if width:
                    if a:
                        cache.rows(0, 1).restore(state)
                    for r in range(1, len(batch)):
                        cache.copy_row(0, r)
                    ids = [parts[i][:-1] + [parts[i][-1]] * (width - len(parts[i]) + 1) for i in batch]  # padded
                    view = cache.rows(0, len(batch))
                    rest = torch.log_softmax(run_model(self.model, torch.tensor(ids, device=device), view).float(), -1)
                    logps = [torch.cat([first[None], rest[r, : len(parts[i]) - 1]]) for r, i in enumerate(batch)]
                for i, logp in zip(batch, logps, strict=True):
                    target = torch.tensor(parts[i], device=logp.device)
                    results[i] = (
                        logp.gather(-1, target[:, None]).sum().item(),
                        bool((logp.argmax(-1) == target).all()),
                    )
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of ln p over a whole text, in the harness's disjoint windows of max_length tokens."""
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="rolling loglikelihood", disable=disable_tqdm):
            windows = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            ]  # fmt: skip
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.qtokenizer.decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(gen_kwargs, 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
                raise InvalidArgument("qwenlite eval decodes greedily; this task asks for sampling (do_sample)")
            if max_gen_toks >= self.max_length:
                raise InvalidArgument(f"max_gen_toks {max_gen_toks} leaves no room for a context in max_length "
                                      f"{self.max_length}")  # fmt: skip
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks) :]
            generated: list[int] = []
            for token in generate_tokens(self.model, ids, SamplingParams(temperature=0.0), max_gen_toks,
                                         stop_ids=self.qtokenizer.eos_token_ids):  # fmt: skip
                generated.append(token)
                if any(term and term in self.qtokenizer.decode(generated[-16:], skip_special_tokens=True)
                       for term in until):  # fmt: skip
                    break
            text = self.qtokenizer.decode(generated, skip_special_tokens=True)
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def task_manager(include_path: str | None, tasks: Sequence[str] = ()) -> TaskManager:
    """The harness's tasks: only those under `include_path` when they hold every one of `tasks` (indexing the
    harness's own ~15,000 takes ~9 s), else its registry too."""
    if include_path is not None and not Path(include_path).is_dir():
        raise QwenliteError(f"--include-path {include_path}: no such directory")
    if include_path is not None and tasks:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager: TaskManager) -> None:
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise QwenliteError(f"unknown task {name!r}{hint}")


def evaluate(
    model_ref: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    output_path: str | Path | None = None,
    quant: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    apply_chat_template: bool = False,
    think: bool | None = None,
    use_cache: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    batch_size: int = 8,
) -> dict:
    """Run `tasks` on a qwenlite model; returns the harness's results dict (and writes it to `output_path` as
    JSON, atomically). `use_cache`: a path prefix for the harness's SQLite cache of finished requests, so an
    interrupted run resumes where it stopped. `batch_size`: continuations of one context scored in one forward.
    `bootstrap_iters`: resamples for the standard errors of metrics that
    have no closed form (the harness's default is 100000; 0 = no standard errors)."""
    if not tasks:
        raise InvalidArgument("--tasks names no task")
    manager = task_manager(include_path, tasks)
    check_tasks(tasks, manager)
    model, tokenizer = load_model(resolve_model_path(model_ref), dtype, quant)
    lm = QwenliteLM(model, tokenizer, max_length, think, batch_size)
    try:
        results = simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, use_cache=use_cache,
            apply_chat_template=apply_chat_template, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        )  # fmt: skip
    except ConnectionError as e:  # the datasets library offline (its errors subclass ConnectionError)
        raise QwenliteError(f"a task's dataset must be downloaded and the hub is unreachable ({e}); offline, "
                            "use local tasks with --include-path") from None  # fmt: skip
    if output_path is not None:
        text = json.dumps(results, indent=2, default=utils.handle_non_serializable, ensure_ascii=False)
        atomic_write(Path(output_path), lambda p: p.write_text(text, encoding="utf-8"))
    return results
