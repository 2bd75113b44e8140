"""``python -m repfx.trt MODEL``: training-form model -> verified plain graph -> .pt2 / .onnx / TensorRT engine."""
