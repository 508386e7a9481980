"""The data format: schema, writer (``pva shards build``), reader and masks. No Lightning.

Layers (``tests/test_layers.py``): the method core <- this package <- the Lightning layer
(``datamodules/``, ``callbacks/``, ``pva/module.py``) <- applications.
"""
