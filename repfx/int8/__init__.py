"""repfx.int8: what INT8 deployment needs beyond the plain graph (calibration data, weight statistics)."""
