"""Shared fixtures: one in-process distributed group (gloo, 1 rank) and a learnable token dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_token_dir  # noqa: E402


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
    from helpers import make_chat_tokenizer

    return make_chat_tokenizer(tmp_path_factory.mktemp("tokenizer"))
