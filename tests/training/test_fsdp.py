"""Sharded training under real `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 and FSDP1.

One launch of `tests/training/distributed/sharded_lora.py` trains the same seeded LoRA Llama in every mode
and saves each adapter from rank 0; this file trains the single-process reference on the whole
batch and checks the sharded runs against it: the loss at every step, and the outputs of each
saved adapter loaded back into an unsharded model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit import PeftModel, get_peft_model_state_dict
from tests.helpers import REPO_ROOT, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "distributed"))
import sharded_lora  # noqa: E402

MODES = ("fsdp2", "fsdp1_orig_params", "fsdp1_flat_params")

pytestmark = pytest.mark.slow  # torchrun starts two processes per mode


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> tuple[dict, str]:
    """The results JSON of one two-rank launch, and the folder holding each mode's adapter."""
    root = tmp_path_factory.mktemp("fsdp")
    result_path, save_root = str(root / "result.json"), str(root / "adapters")
    src = str(REPO_ROOT / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.join(HERE, "distributed", "sharded_lora.py"), result_path, save_root,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(result_path, encoding="utf-8") as fh:
        return json.load(fh), save_root


@pytest.fixture(scope="module")
def single_run() -> tuple[PeftModel, list[float]]:
    return sharded_lora.train_single()


@pytest.mark.parametrize("mode", MODES)
def test_sharded_loss_equals_single_process_loss_at_every_step(sharded_run, single_run, mode):
    results, _ = sharded_run
    _, single_losses = single_run
    assert len(results[mode]) == sharded_lora.STEPS
    assert results[mode] == pytest.approx(single_losses, abs=1e-4)
    assert single_losses[-1] < single_losses[0]  # the adapters did train


@pytest.mark.parametrize("mode", MODES)
def test_adapter_saved_from_rank0_is_full_shape_and_reloads_unsharded(sharded_run, single_run, mode):
    _, save_root = sharded_run
    single_model, _ = single_run
    reloaded = PeftModel.from_pretrained(sharded_lora.build_base(), os.path.join(save_root, mode))
    expected = get_peft_model_state_dict(single_model)
    saved = get_peft_model_state_dict(reloaded)
    assert sorted(saved) == sorted(expected)  # no `_fsdp_wrapped_module.` in any key
    for key, tensor in expected.items():
        assert saved[key].shape == tensor.shape, key
    ids = sharded_lora.batch()
    single_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, single_model(input_ids=ids).logits, rtol=0, atol=1e-4
        )


def test_fsdp1_flat_params_refuse_a_unit_mixing_frozen_base_and_trainable_adapters(sharded_run):
    results, _ = sharded_run
    assert "requires_grad" in results["fsdp1_flat_params_mixed_unit_error"]
