"""How close a quantized model's outputs are to fp32's: SNR per output, top-1 agreement for classifiers.

Pure numpy. SNR (signal power over error power, in dB) says how much of each output survives;
top-1 agreement (the share of samples whose argmax class is unchanged) is what a classifier's
user sees, and is only defined for classifier-shaped outputs ([N, C] with C > 1). A ``Target``
says what is good enough (issue 18's default: 99% agreement and 20 dB); ``Scores`` holds one
model's numbers and whether they meet it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Top-1 agreement of ``candidate`` with ``reference`` for [N, C>1] outputs; None for other shapes."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    _same_shape(reference, candidate)
    if reference.ndim != 2 or reference.shape[1] < 2 or reference.shape[0] == 0:
        return None
    return float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(sum reference^2 / sum (reference - candidate)^2), in float64; inf when they are equal."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    _same_shape(reference, candidate)
    noise = float(np.sum((reference - candidate) ** 2))
    signal = float(np.sum(reference ** 2))
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


def _same_shape(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: reference {reference.shape}, candidate {candidate.shape}")


@dataclass(frozen=True)
class Target:
    """Good enough: every classifier output agrees on at least ``agreement`` of samples, every output has at
    least ``snr_db`` dB."""

    agreement: float = 0.99
    snr_db: float = 20.0

    def __post_init__(self) -> None:
        if not (isinstance(self.agreement, (int, float)) and 0 <= self.agreement <= 1):
            raise ValueError(f"int8_target's agreement is a fraction in [0, 1] (0.99 for 99%), got {self.agreement!r}")
        if not (isinstance(self.snr_db, (int, float)) and math.isfinite(self.snr_db)):
            raise ValueError(f"int8_target's SNR is a finite number of dB, got {self.snr_db!r}")


@dataclass(frozen=True)
class Scores:
    """One candidate against the reference, per output (``agreement`` None where the output is no classifier's)."""

    snr_db: tuple[float, ...]
    agreement: tuple[float | None, ...]

    @property
    def worst_snr_db(self) -> float:
        return min(self.snr_db)

    @property
    def worst_agreement(self) -> float | None:
        defined = [value for value in self.agreement if value is not None]
        return min(defined) if defined else None

    def meets(self, target: Target) -> bool:
        worst = self.worst_agreement
        return self.worst_snr_db >= target.snr_db and (worst is None or worst >= target.agreement)

    def key(self) -> tuple[float, float]:
        """Orders candidates, better last: agreement first (what users see), SNR to break ties."""
        worst = self.worst_agreement
        return (1.0 if worst is None else worst, self.worst_snr_db)

    def describe(self) -> str:
        parts = [f"{value:.1f} dB" for value in self.snr_db]
        text = "SNR " + ", ".join(parts)
        worst = self.worst_agreement
        return text if worst is None else f"top-1 agreement {100 * worst:.1f}%, {text}"


def score(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Scores:
    """``Scores`` of ``candidate``'s outputs against ``reference``'s, output by output."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs, {len(candidate)} candidate outputs")
    return Scores(tuple(snr_db(r, c) for r, c in zip(reference, candidate)),
                  tuple(agreement(r, c) for r, c in zip(reference, candidate)))
