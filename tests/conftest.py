"""Shared fixtures. Built once per session: the real Qwen3.5 tokenizer files are ~33 MB."""

import pytest

from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import write_tokenizer_files


@pytest.fixture(scope="session")
def qwen35_tokenizer_dir(tmp_path_factory):
    """A directory holding tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen3.5."""
    path = tmp_path_factory.mktemp("qwen35_tokenizer")
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="session")
def qwen35_tokenizer(qwen35_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen35_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen36_tokenizer_dir(qwen35_tokenizer_dir, tmp_path_factory):
    """The same tokenizer files with a Qwen3.6-style chat template (helpers.qwen36_style_template)."""
    from helpers import qwen36_style_template

    path = tmp_path_factory.mktemp("qwen36_tokenizer")
    for file in qwen35_tokenizer_dir.iterdir():
        (path / file.name).symlink_to(file)
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.jinja").write_text(qwen36_style_template())
    return path
