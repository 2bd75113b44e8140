"""The commands: ``python -m repfx.trt`` (``trt``: model file -> deploy files) and
``python -m repfx`` (``demo``: re-parameterize a bundled sample and print the report)."""
