"""Data files shipped with repfx: torch-tensorrt's converter and decomposition lists, extracted from its wheel."""
