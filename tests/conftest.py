"""Shared fixtures: tiny models built from configs (no downloads, ever)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from tests.helpers import tiny_llama  # noqa: E402


def pytest_collection_modifyitems(items) -> None:
    """Mark tests by where they live: `-m oracle` (PEFT comparisons) and `-m cuda` select them."""
    for item in items:
        path = item.path.as_posix()
        if "/tests/oracle/" in path:
            item.add_marker(pytest.mark.oracle)
        if path.endswith("/tests/kernels/test_cuda.py"):
            item.add_marker(pytest.mark.cuda)


hf_logging.set_verbosity_error()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    """The folder of a seeded full-precision tiny Llama 64 wide (`quantized_helpers.CONFIG`), for
    loading through bitsandbytes."""
    from tests.quantized_helpers import CONFIG

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(directory)
    return str(directory)
