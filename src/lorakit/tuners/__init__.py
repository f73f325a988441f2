"""Adapter families, one folder each: `base.py` (AdapterLayer, ModulesToSaveWrapper), `lora/` and
`bottleneck/`. The package files import nothing, so importing one module loads no other family."""
