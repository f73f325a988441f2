"""lorakit: LoRA for PyTorch and transformers models, with PEFT's API and PEFT's files.

Change `from peft import ...` to `from lorakit import ...`; adapters saved by either library load
in the other.
"""

from .config import PeftConfig, PeftType, TaskType
from .model import LoraModel
from .nf4 import NF4Linear, quantize_model_nf4
from .optimizers import create_loraplus_optimizer
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from .tuners.bottleneck.config import BottleneckConfig
from .tuners.lora.config import LoftQConfig, LoraConfig
from .tuners.lora.quantized import replace_lora_weights_loftq
from .utils import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "NF4Linear",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "create_loraplus_optimizer",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "quantize_model_nf4",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]
