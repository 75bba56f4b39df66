"""Pretraining data: documents -> a token cache -> packed sequences -> a resumable stream of batches.

Input formats, chosen by file suffix (a directory stands for the supported files under it, in sorted order):
- `.txt`, `.md`: the whole file is one document (a book, an article, a source file). Blank lines inside prose
  are paragraphs, not document boundaries; put many short documents in one JSONL file instead.
- `.jsonl`: one JSON object per line with a string "text" field; blank lines are skipped.
- `.parquet`: a string column "text", one document per row (read with pyarrow).
Empty documents are skipped. A malformed line, a missing or non-string "text", or an empty corpus is a
`QwenliteError` naming the file and line (or row); nothing is written until the whole input has been read.

Token cache: every document is encoded and followed by `<|endoftext|>`, and the stream is stored as raw uint32
ids (`tokens-KEY.bin`) beside a small manifest (`tokens-KEY.json`). KEY hashes the input files' paths, sizes
and mtimes, the tokenizer.json bytes and the cache format, so a second run on the same input memory-maps the
ids instead of tokenizing again, and caches of different inputs live side by side in one directory. Special
token strings inside raw text are encoded as plain text: a document cannot forge an `<|im_start|>`.

Packing: the stream is cut into windows of seq_len + 1 tokens that overlap by one (inputs = window[:-1],
targets = window[1:]), so every token after the first is a target exactly once; the tail that does not fill a
window is dropped. Documents are packed back to back, separated by EOS, with no attention masking at the
boundaries (the model attends across them, as GPT-style pretraining does).

Held-out split: every k-th window (k = round(1 / val_fraction)) is held out, so the held-out set samples the
whole corpus rather than the tail of the last file. A document straddling two windows can touch both sides.

Batches: each epoch is a permutation of the training windows drawn from (seed, epoch). The whole state is one
integer, the number of windows consumed over all ranks; rank r of W takes its slice of each global batch, so
the global order does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tqdm import tqdm

from qwenlite.errors import QwenliteError
from qwenlite.io.files import atomic_write
from qwenlite.text.tokenizer import ENDOFTEXT

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
CACHE_VERSION = 1
ENCODE_BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this many characters


# ---------------------------------------------------------------------------------------------
# Reading documents


def list_data_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and the supported files under directories named, in order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise QwenliteError(f"{path}: no {', '.join(SUFFIXES)} files in this directory")
            files += found
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise QwenliteError(f"{path}: unsupported data file; use {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise QwenliteError(f"{path}: no such file or directory")
    if not files:
        raise QwenliteError("no data files given")
    return files


def iter_documents(path: Path) -> Iterator[tuple[str, int]]:
    """Yield (text, input bytes it stands for) for each non-empty document of one file."""
    if path.suffix in TEXT_SUFFIXES:
        yield from _read_text(path)
    elif path.suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path)
    elif path.suffix in PARQUET_SUFFIXES:
        yield from _read_parquet(path)
    else:
        raise QwenliteError(f"{path}: unsupported data file; use {', '.join(SUFFIXES)}")


def _read_text(path: Path) -> Iterator[tuple[str, int]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise QwenliteError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    if text:
        yield text, len(raw)


def _read_jsonl(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise QwenliteError(f"{path}:{line}: malformed JSON: {e}") from None
            if not isinstance(record, dict):
                raise QwenliteError(
                    f'{path}:{line}: expected an object with a "text" field, got {type(record).__name__}'
                )
            if "text" not in record:
                keys = ", ".join(sorted(record)) or "none"
                raise QwenliteError(f'{path}:{line}: no "text" field (keys: {keys})')
            text = record["text"]
            if not isinstance(text, str):
                raise QwenliteError(f'{path}:{line}: "text" must be a string, got {type(text).__name__}')
            if text:
                yield text, len(raw)


def _read_parquet(path: Path) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QwenliteError(f"{path}: reading Parquet needs pyarrow (pip install 'qwenlite[train]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise QwenliteError(f"{path}: not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise QwenliteError(f'{path}: no "text" column (columns: {", ".join(schema.names) or "none"})')
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise QwenliteError(f'{path}: column "text" must hold strings, it holds {kind}')
    share = path.stat().st_size // max(parquet.metadata.num_rows, 1)
    row = 0
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise QwenliteError(f'{path}: row {row}: "text" is null')
            if text:
                yield text, share


# ---------------------------------------------------------------------------------------------
# Token cache


@dataclass
class TokenCorpus:
    tokens: np.ndarray  # (N,) uint32, memory-mapped from the cache
    eos_id: int
    files: list[Path]
    num_documents: int
    sha256: str  # of the token stream: what a resumed run checks, whatever the files' mtimes
    cache_path: Path
    from_cache: bool  # the cache already held these files' tokens: nothing was tokenized


def load_tokenizer_for_data(tokenizer_dir: str | Path) -> tuple[tokenizers.Tokenizer, bytes, int]:
    """(tokenizer, its tokenizer.json bytes, the <|endoftext|> id) for encoding raw text."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise QwenliteError(f"no tokenizer.json in {tokenizer_dir}")
    raw = path.read_bytes()
    try:
        tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise QwenliteError(f"cannot read {path}: {e}") from None
    eos = tok.token_to_id(ENDOFTEXT)
    if eos is None:
        raise QwenliteError(f"{path} has no {ENDOFTEXT} token to separate documents")
    tok.encode_special_tokens = True  # raw text never produces control tokens
    return tok, raw, eos


def cache_key(files: Sequence[Path], tokenizer_json: bytes, eos_id: int) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = {
        "version": CACHE_VERSION,
        "files": stats,
        "tokenizer": hashlib.sha256(tokenizer_json).hexdigest(),
        "eos_id": eos_id,
    }
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:24]


def tokenize_corpus(
    paths: Sequence[str | Path], tokenizer_dir: str | Path, cache_dir: str | Path, show_progress: bool = True
) -> TokenCorpus:
    """Encode the documents of `paths` into `cache_dir` (or reuse the tokens already there) and map them."""
    files = list_data_files(paths)
    tok, tokenizer_json, eos = load_tokenizer_for_data(tokenizer_dir)
    key = cache_key(files, tokenizer_json, eos)
    cache = Path(cache_dir)
    bin_path, manifest_path = cache / f"tokens-{key}.bin", cache / f"tokens-{key}.json"
    manifest = _read_manifest(manifest_path, bin_path)
    from_cache = manifest is not None
    if manifest is None:
        manifest = _write_cache(files, tok, eos, bin_path, show_progress)
        manifest["files"] = [str(f) for f in files]
        text = json.dumps(manifest, indent=2)
        atomic_write(manifest_path, lambda p: p.write_text(text))
    n = manifest["num_tokens"]
    tokens = np.memmap(bin_path, dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
    return TokenCorpus(tokens, eos, files, manifest["num_documents"], manifest["sha256"], bin_path, from_cache)


def _read_manifest(manifest_path: Path, bin_path: Path) -> dict | None:
    """The manifest of a complete cache entry, or None (absent, unreadable, or not matching its .bin)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        complete = bin_path.stat().st_size == 4 * manifest["num_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


def _write_cache(files: list[Path], tok: tokenizers.Tokenizer, eos: int, bin_path: Path, show_progress: bool) -> dict:
    """Tokenize into a temporary file renamed over `bin_path` once every document is read."""
    counts = {"num_tokens": 0, "num_documents": 0}
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                                          disable=not show_progress) as bar:  # fmt: skip
            batch: list[str] = []
            chars = 0

            def flush() -> None:
                for encoding in tok.encode_batch(batch, add_special_tokens=False):
                    ids = np.array([*encoding.ids, eos], dtype=np.uint32)
                    out.write(ids.tobytes())
                    digest.update(ids.tobytes())
                    counts["num_tokens"] += len(ids)
                counts["num_documents"] += len(batch)
                batch.clear()

            for path in files:
                for text, nbytes in iter_documents(path):
                    batch.append(text)
                    chars += len(text)
                    bar.update(nbytes)
                    if chars >= ENCODE_BATCH_CHARS:
                        flush()
                        chars = 0
            flush()
            if not counts["num_documents"]:
                raise QwenliteError(f"no text in {', '.join(map(str, files))}: the corpus is empty")

    atomic_write(bin_path, write)
    return {"version": CACHE_VERSION, **counts, "eos_id": eos, "dtype": "uint32", "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Packing, held-out split, batches


@dataclass
class PackedSequences:
    """The token stream as windows of seq_len + 1 tokens overlapping by one (see the module docstring)."""

    tokens: np.ndarray
    seq_len: int

    @property
    def num_sequences(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 token windows."""
        T = self.seq_len
        rows = np.stack([self.tokens[i * T : i * T + T + 1] for i in indices])
        return torch.from_numpy(rows.astype(np.int64))


def split_sequences(num_sequences: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) window indices: every k-th window held out, k = round(1 / val_fraction); at least
    one when val_fraction > 0 and there are two windows or more."""
    all_idx = np.arange(num_sequences)
    if val_fraction <= 0 or num_sequences < 2:
        return all_idx, all_idx[:0]
    k = max(2, round(1 / val_fraction))
    held = all_idx % k == k - 1
    if not held.any():
        held[-1] = True
    return all_idx[~held], all_idx[held]


def pack_corpus(
    corpus: TokenCorpus, seq_len: int, val_fraction: float
) -> tuple[PackedSequences, np.ndarray, np.ndarray]:
    data = PackedSequences(corpus.tokens, seq_len)
    if data.num_sequences < (2 if val_fraction > 0 else 1):
        raise QwenliteError(
            f"the corpus ({', '.join(map(str, corpus.files))}) has {len(corpus.tokens)} tokens: too few for "
            f"{'a training and a held-out' if val_fraction > 0 else 'one'} sequence of {seq_len} + 1 tokens; "
            "add text or lower --seq-len"
        )
    train, val = split_sequences(data.num_sequences, val_fraction)
    return data, train, val


class BatchIterator:
    """Training batches in a fixed order: epoch e is a permutation of the training windows drawn from
    (seed, e). `position` (windows consumed over all ranks) is the whole state; rank r of W takes windows
    [position + r * B, position + (r + 1) * B) of each global batch of W * B."""

    def __init__(
        self,
        data: PackedSequences,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
    ):
        self.data, self.indices, self.batch_size, self.seed = data, indices, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._epoch, self._order = -1, indices

    @property
    def epoch(self) -> float:
        return self.position / len(self.indices)

    def next(self) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64: this rank's share of the next global batch."""
        start = self.position + self.rank * self.batch_size
        windows = [self._window(start + j) for j in range(self.batch_size)]
        self.position += self.batch_size * self.world_size
        return self.data.get(windows)

    def _window(self, k: int) -> int:
        epoch, i = divmod(k, len(self.indices))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.indices)
        return int(self._order[i])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def held_out_batches(
    data: PackedSequences, indices: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the held-out windows (every W-th from r) as (windows (B, T + 1), weights (B,)).
    Every rank gets the same number of batches (FSDP's forward is collective): a short share is padded with
    windows of weight 0."""
    per_rank = -(-len(indices) // world_size)
    mine = [int(i) for i in indices[rank::world_size]]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [int(indices[0])] * (per_rank - len(mine))
    for start in range(0, per_rank, batch_size):
        yield data.get(mine[start : start + batch_size]), torch.tensor(weights[start : start + batch_size])
