"""Shared fixtures: a real LLaMA-family tokenizer and tiny random COMM models saved to temp folders."""

from __future__ import annotations

import contextlib
import copy
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from comm import build_from_components  # noqa: E402
from comm.demo.tiny import (
    save_random_components,  # noqa: E402
    tiny_config,
)

if TYPE_CHECKING:
    from comm.pipeline import CommPipeline

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_TOKENIZER_DIR = FIXTURES / "tokenizer-llama-family"


@pytest.fixture(scope="session")
def _llama_tokenizer_cached():
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)


@pytest.fixture
def llama_tokenizer(_llama_tokenizer_cached):
    """A fresh copy of the Mistral/LLaMA SentencePiece tokenizer (32000 pieces) from the test fixtures."""
    return copy.deepcopy(_llama_tokenizer_cached)


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory) -> dict[str, str]:
    """Random-init CLIP, DINOv2 and Llama checkpoints of `tiny_config()` saved as separate folders."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("components")
    return save_random_components(folder, tiny_config(vocab_size=32000))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_components, _llama_tokenizer_cached) -> Path:
    """A tiny COMM model and its processor saved with `save_pretrained` (load them with `from_pretrained`)."""
    torch.manual_seed(0)
    model, processor = build_from_components(
        tiny_components["clip"],
        tiny_components["dino"],
        tiny_components["llm"],
        tokenizer=copy.deepcopy(_llama_tokenizer_cached),
        model_max_length=256,
        **tiny_config().tower_reading_fields(),
    )
    folder = tmp_path_factory.mktemp("tiny_comm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_huge_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG of a few dozen bytes whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """One torch CPU thread inside the block: tiny-model ops gain nothing from more, and a busy machine stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch CPU thread for the test (see `single_torch_thread`); modules use it with ``usefixtures``."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> CommPipeline:
    """The tiny COMM model as a CPU `CommPipeline`, loaded once a test module."""
    from comm.pipeline import CommPipeline

    return CommPipeline.from_pretrained(tiny_model_dir, device="cpu")
