"""spartune.sweeps in the wheel: Hydra's pkg:// search path needs a package with an __init__.py.

One YAML per study; `spartune-init` copies them into ./sweeps to edit.
"""
