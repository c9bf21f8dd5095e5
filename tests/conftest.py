"""Shared fixtures: one in-process distributed group (gloo, 1 rank) and a learnable token dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_token_dir  # noqa: E402

# the longest files, started first so that under `make test`'s two workers (one file per worker at a time)
# neither is left with a long file at the end while the other idles
LONGEST_FIRST = ("test_scripts.py", "test_user_data_chain.py", "test_data_process.py", "test_cli_and_resume.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def dist():
    """Start torch.distributed once for every in-process DeepSpeed test."""
    from utils.dist import init_distributed
    from utils.log import setup_logging

    setup_logging()
    init_distributed()
    return True


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    from testkit.chat_tokenizer import make_chat_tokenizer

    return make_chat_tokenizer(tmp_path_factory.mktemp("tokenizer"))
