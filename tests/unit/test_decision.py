"""The line's thresholds: the escape target is met on validation, the review budget is spent, and the
rates count what they say."""

from __future__ import annotations

import numpy as np
import pytest

from ase_ray.models.decision import (
    choose_decision,
    choose_defect_threshold,
    choose_review_threshold,
    defect_probability,
    label_line_rates,
    line_rates,
    review_rates,
    split_line_figures,
)


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.25, 0.5])
def test_defect_threshold_meets_the_escape_target_and_is_the_largest_that_does(target):
    rng = np.random.default_rng(0)
    defect = rng.random(400) < 0.3
    p = np.clip(np.where(defect, rng.normal(0.7, 0.2, 400), rng.normal(0.3, 0.2, 400)), 0, 1)
    t = choose_defect_threshold(p, defect, target)
    rates = line_rates(p, defect, t)
    assert rates["escape_rate"] <= target + 1e-12
    # Any larger threshold lets one more defect through and breaks the target (ties aside).
    above = np.sort(np.unique(p[defect]))
    nxt = above[above > t]
    if len(nxt):
        assert line_rates(p, defect, float(nxt[0]))["escape_rate"] > target
    # A larger target never raises the overkill.
    if target < 0.5:
        assert line_rates(p, defect, choose_defect_threshold(p, defect, target + 0.1))["overkill_rate"] <= rates["overkill_rate"]


def test_line_rates_count_escapes_and_overkills():
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.1])
    defect = np.array([True, True, False, False, False])
    rates = line_rates(p, defect, 0.5)
    assert (rates["escapes"], rates["overkills"], rates["defects"], rates["normals"]) == (1, 1, 2, 3)
    assert rates["escape_rate"] == 0.5 and rates["overkill_rate"] == pytest.approx(1 / 3)
    assert choose_defect_threshold(p, defect, 0.0) == 0.2  # both defects rejected
    assert choose_defect_threshold(p, np.zeros(5, bool), 0.05) == 0.5  # nothing to meet
    with pytest.raises(ValueError, match="max_escape_rate"):
        choose_defect_threshold(p, defect, 1.5)


def test_multiclass_collapses_to_normal_against_any_defect():
    classes = ["crack", "normal", "blowhole"]
    probs = np.array([[0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1]])
    np.testing.assert_allclose(defect_probability(probs, classes, "normal"), [0.2, 0.9, 0.3])
    rates = label_line_rates(probs.argmax(1), np.array([2, 0, 1]), classes, "normal")
    assert (rates["escapes"], rates["overkills"]) == (1, 0)  # the blowhole predicted normal escaped
    with pytest.raises(ValueError, match="not one of"):
        defect_probability(probs, classes, "good")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 1.0])
def test_review_threshold_spends_the_budget(fraction):
    confidence = np.random.default_rng(1).uniform(0.3, 1.0, 200)
    t = choose_review_threshold(confidence, fraction)
    assert np.mean(confidence < t) == pytest.approx(fraction, abs=1 / 200)


def test_review_catches_the_low_confidence_errors():
    confidence = np.array([0.4, 0.5, 0.95, 0.9, 0.99, 0.97])
    correct = np.array([False, False, True, False, True, True])
    rates = review_rates(confidence, correct, choose_review_threshold(confidence, 2 / 6))
    assert rates["reviewed"] == 2 and rates["errors"] == 3 and rates["errors_caught"] == 2
    assert rates["error_catch_rate"] == pytest.approx(2 / 3)


def test_decision_record_is_chosen_on_validation_and_applies_to_another_split():
    rng = np.random.default_rng(2)
    classes = ["normal", "defect"]
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 300), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], 1)
    record = choose_decision(probs[:150], labels[:150], classes, "normal", 0.05, 0.1)
    assert record["val_line"]["escape_rate"] <= 0.05 and record["rows"] == 150
    assert record["val_review"]["review_share"] == pytest.approx(0.1, abs=1 / 150)
    test = split_line_figures(probs[150:], labels[150:], classes, record)
    assert test["line"]["threshold"] == record["defect_threshold"]
    assert test["line"]["defects"] + test["line"]["normals"] == 150
    assert 0 < test["review"]["reviewed"] < 150
    none = choose_decision(probs, labels, ["a", "b"], None, 0.05, 0.1)
    assert none["defect_threshold"] is None and "line" not in split_line_figures(probs, labels, ["a", "b"], none)
