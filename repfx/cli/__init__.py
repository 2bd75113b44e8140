"""The commands: ``python -m repfx.trt`` (``trt``: model file -> deploy files) and
``python -m repfx`` (``demo``: re-parameterize a bundled sample and print the report).

``trt`` leaves to a module each: the memory rule for its inputs (``memory``), the Triton
entry it adds (``triton_entry``), what it prints (``results``), its progress display
(``progress``) and how a Ctrl-C is seen (``interrupts``)."""
