"""Tests of LoRA and its variants (`lorakit.tuners.lora`)."""
