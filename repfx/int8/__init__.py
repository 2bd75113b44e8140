"""INT8 post-training quantization of a plain graph with the field's own tools, checked on held-out data.

Two formats, because the target decides (issue 18): ``"tensorrt"`` is NVIDIA ModelOpt's ONNX PTQ
(TensorRT's explicit quantization: symmetric int8 QDQ, float bias; ``quantizers``, run in a
subprocess by ``modelopt_worker``), checked against TensorRT's rules by ``qdq_check``; ``"cpu"`` is
ONNX Runtime's ``quantize_static`` in the format ORT fuses to ``QLinearConv``. ``calibration`` loads
the user's data (never random data) and splits off a held-out part; ``metrics`` scores a quantized
model against fp32 (SNR, top-1 agreement), ``sensitivity`` quantizes one layer at a time and plans
which few layers stay float, ``weight_stats`` says what folding did to each layer's weight ranges,
and ``modules`` re-emits a plain GraphModule's convolutions as ``nn.Conv*``/``nn.Linear``
submodules so module-based quantizers (ModelOpt's ``mtq``) find them. ``deploy`` runs it all for
``repfx.compile`` / ``repfx.export`` at ``precision="int8"``.
"""
