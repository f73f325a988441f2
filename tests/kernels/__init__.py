"""Tests of the fused and grouped compute (`lorakit.kernels`)."""
