"""Where a model comes from: a local checkpoint directory, or a hub id downloaded once into the standard
Hugging Face cache (with huggingface_hub's progress bars)."""

from __future__ import annotations

from pathlib import Path

from qwenlite.errors import QwenliteError

DEFAULT_MODEL = "Qwen/Qwen3.5-0.8B"
# What qwenlite reads from a checkpoint; the rest of a repository (the vision tower's preprocessor
# configs, images, licences aside) need not be fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "LICENSE*"]


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def resolve_model_path(model: str) -> Path:
    """A local directory as it is; a hub id from the cache, downloading it the first time."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path  # a llama.cpp GGUF: qwenlite.io.load.load_model reads it
        raise QwenliteError(f"{model} is a file; pass a checkpoint directory (config.json, *.safetensors) or a .gguf")
    if not _looks_like_hub_id(model):
        raise QwenliteError(f"no such model directory: {model}")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        pass  # not cached yet
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except RepositoryNotFoundError:
        raise QwenliteError(f"{repo_id} is neither a local directory nor a model on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise QwenliteError(
            f"cannot download {repo_id} from the Hugging Face hub (no network? {type(e).__name__}); "
            f"pass a local checkpoint directory instead, e.g. `qwenlite run ./Qwen3.5-0.8B 'Hello'`"
        ) from None
