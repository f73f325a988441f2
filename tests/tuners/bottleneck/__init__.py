"""Tests of bottleneck adapters (`lorakit.tuners.bottleneck`)."""
