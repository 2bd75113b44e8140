"""metrics: SNR and top-1 agreement on hand-computed cases; Scores against a Target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from repfx.int8.metrics import Scores, Target, agreement, score, snr_db


def test_snr_of_a_known_error():
    reference = np.ones(100)
    assert snr_db(reference, reference * 1.1) == pytest.approx(20.0)  # signal 100, noise 100 * 0.01 = 1


def test_snr_of_equal_outputs_is_infinite_and_of_a_zero_reference_minus_infinite():
    reference = np.arange(6.0).reshape(2, 3)
    assert snr_db(reference, reference.copy()) == math.inf
    assert snr_db(np.zeros(3), np.ones(3)) == -math.inf


@pytest.mark.parametrize("shape", [(8,), (8, 1), (2, 3, 4), (0, 5)], ids=["1-D", "one-class", "3-D", "empty"])
def test_agreement_is_none_for_outputs_that_are_no_classifiers(shape):
    assert agreement(np.zeros(shape), np.zeros(shape)) is None


def test_agreement_counts_unchanged_argmax():
    reference = np.array([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 0.0]])
    candidate = np.array([[2.0, 1.0], [3.0, 2.0], [5.0, 4.5], [0.5, 0.4]])
    assert agreement(reference, candidate) == 0.75


def test_outputs_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        snr_db(np.zeros((2, 3)), np.zeros((3, 2)))


def test_scores_meet_a_target_on_every_output():
    logits = np.random.default_rng(0).normal(size=(50, 10))
    features = np.random.default_rng(1).normal(size=(50, 4, 2))
    good = score([logits, features], [logits + 1e-3, features + 1e-3])
    assert good.agreement[1] is None and good.meets(Target())
    noisy = score([logits, features], [logits + 1e-3, features * 1.2])  # 14 dB on the second output
    assert noisy.worst_snr_db == pytest.approx(20 * math.log10(5)) and not noisy.meets(Target())
    assert noisy.key() < good.key()
    assert "top-1 agreement 100.0%" in good.describe()


def test_scores_without_a_classifier_compare_on_snr():
    scores = Scores(snr_db=(25.0,), agreement=(None,))
    assert scores.worst_agreement is None and scores.meets(Target(snr_db=20)) and not scores.meets(Target(snr_db=30))
