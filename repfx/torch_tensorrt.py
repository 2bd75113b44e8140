"""The public import path of the torch-tensorrt hook (``repfx.integrations.torch_tensorrt``).

Existing torch-tensorrt scripts add ``import repfx.torch_tensorrt`` and
``repfx.torch_tensorrt.install()``; the hook itself lives with the other integrations.
"""

from repfx.integrations.torch_tensorrt import install, repfx_lowering_pass

__all__ = ["install", "repfx_lowering_pass"]
