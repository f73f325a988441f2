"""Oracle-suite setup: never touch the network, keep transformers quiet, stay single-threaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _single_thread():
    """The models are tiny: intra-op threading only adds overhead (and stalls on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
