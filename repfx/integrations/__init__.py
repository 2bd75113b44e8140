"""Hooks of the repfx pipeline into other tools: ``torch.compile(backend="repfx")`` (``dynamo``)
and torch-tensorrt's lowering passes (``torch_tensorrt``)."""
