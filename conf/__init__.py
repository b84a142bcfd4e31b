"""spartune.conf in the wheel: Hydra's pkg:// search path needs a package with an __init__.py.

The config groups here are values only; the schema is src/spartune/config.py.
"""
