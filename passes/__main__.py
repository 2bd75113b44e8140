"""``python -m repfx.passes``: print the pass pipeline, in the order it runs."""

from repfx.passes import describe_pipeline

print(describe_pipeline())
