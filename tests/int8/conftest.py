"""Fixtures of this folder's tests: small exported nets (``small_onnx``, ``outlier_onnx``) and their feeds."""

from int8_fixtures import calibration, held_out, outlier_onnx, small_onnx  # noqa: F401  (pytest finds fixtures by name)
