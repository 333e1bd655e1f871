"""Temperature scaling: it fixes an overconfident model without changing a prediction; ECE by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ase_ray.models.calibration import expected_calibration_error, fit_temperature, nll, softmax


def overconfident(n: int = 2000, classes: int = 4, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(z); the model reports sharpen * z: right as often, far surer."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 1.5
    p = softmax(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return sharpen * z, labels


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert before > 0.1 and after < before / 3
    assert nll(logits, labels, t) < nll(logits, labels)
    np.testing.assert_array_equal(softmax(logits, t).argmax(1), logits.argmax(1))  # no prediction changes
    held_out, held_labels = overconfident(seed=1)  # and it holds on rows it was not fitted on
    assert expected_calibration_error(softmax(held_out, t), held_labels) < \
        expected_calibration_error(softmax(held_out), held_labels) / 3


def test_a_calibrated_model_is_left_alone():
    logits, labels = overconfident(sharpen=1.0)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)


def test_ece_hand_value():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins: 0.9 (two rows, accuracy 0.5): |0.5-0.9| * 2; 0.6 (right): 0.4; 0.7 (right): 0.3
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.8 + 0.4 + 0.3) / 4)
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, int))
