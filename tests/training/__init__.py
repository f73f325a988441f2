"""Tests of training: LoRA+, the trainers, recipes, sharding."""
