"""Tests of the adapter families (`lorakit.tuners`)."""
