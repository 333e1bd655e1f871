"""The line's figures and decisions: P(defect), the reject threshold that meets an escape target,
escape and overkill rates, and the review threshold that meets a review budget.

An AOI line judges a classifier by two rates on the normal-vs-defect question (any defect class
counts as defect):

- **escape rate**: the share of defective parts passed as normal (the costly error);
- **overkill rate**: the share of good parts rejected.

A part is rejected when ``P(defect) = 1 - P(normal) >= defect_threshold``. The threshold is chosen on
the validation split as the largest one whose escape rate is at most ``max_escape_rate`` (the largest
threshold rejects the fewest good parts). A person reviews the parts whose top probability is under
``review_threshold``, chosen on validation so that ``review_fraction`` of the parts go to review.
Everything here is numpy on arrays that the caller computed: no model, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PASS, REJECT = "pass", "reject"


def defect_probability(probs: np.ndarray, classes: list[str], normal_class: str) -> np.ndarray:
    """``1 - P(normal)`` per row: the binary task's P(defect), the multi-class task collapsed."""
    if normal_class not in classes:
        raise ValueError(f"normal class {normal_class!r} is not one of {classes}")
    return 1.0 - np.asarray(probs, np.float64)[:, classes.index(normal_class)]


def defect_truth(labels: np.ndarray, classes: list[str], normal_class: str) -> np.ndarray:
    """True where the true label is a defect class."""
    return np.asarray(labels) != classes.index(normal_class)


def choose_defect_threshold(p_defect: np.ndarray, defect: np.ndarray, max_escape_rate: float) -> float:
    """The largest threshold whose escape rate on these rows is at most ``max_escape_rate``.

    With m defective rows, at most ``floor(max_escape_rate * m)`` of them may pass: the threshold is the
    P(defect) of the defect ranked just above those (ties at it are rejected). Without a defective row
    there is nothing to meet: 0.5."""
    if not 0.0 <= max_escape_rate <= 1.0:
        raise ValueError(f"max_escape_rate {max_escape_rate} is not within [0, 1]")
    scores = np.sort(np.asarray(p_defect, np.float64)[np.asarray(defect, bool)])
    if len(scores) == 0:
        return 0.5
    allowed = int(np.floor(max_escape_rate * len(scores) + 1e-9))
    if allowed >= len(scores):
        return float(np.nextafter(scores[-1], np.inf))  # every part passes
    return float(scores[allowed])


def line_rates(p_defect: np.ndarray, defect: np.ndarray, threshold: float) -> dict[str, Any]:
    """Escape and overkill rates (and their counts) of rejecting ``p_defect >= threshold``."""
    reject = np.asarray(p_defect, np.float64) >= threshold
    defect = np.asarray(defect, bool)
    defects, normals = int(defect.sum()), int((~defect).sum())
    escapes, overkills = int((defect & ~reject).sum()), int((~defect & reject).sum())
    return {
        "escape_rate": escapes / defects if defects else 0.0,
        "overkill_rate": overkills / normals if normals else 0.0,
        "escapes": escapes, "overkills": overkills, "defects": defects, "normals": normals,
        "threshold": float(threshold),
    }


def label_line_rates(predicted: np.ndarray, labels: np.ndarray, classes: list[str], normal_class: str) -> dict[str, Any]:
    """Escape and overkill of the predicted labels themselves (a defect class predicted = rejected)."""
    normal = classes.index(normal_class)
    rates = line_rates((np.asarray(predicted) != normal).astype(np.float64), np.asarray(labels) != normal, 0.5)
    rates["threshold"] = None
    return rates


def choose_review_threshold(confidence: np.ndarray, review_fraction: float) -> float:
    """The confidence under which ``review_fraction`` of these rows fall (``confidence < threshold``
    is sent to review): the k-th lowest confidence with k = floor(fraction * n); 0 sends none."""
    if not 0.0 <= review_fraction <= 1.0:
        raise ValueError(f"review_fraction {review_fraction} is not within [0, 1]")
    ranked = np.sort(np.asarray(confidence, np.float64))
    k = int(np.floor(review_fraction * len(ranked) + 1e-9))
    if k == 0:
        return 0.0
    if k >= len(ranked):
        return float(np.nextafter(ranked[-1], np.inf))
    return float(ranked[k])


def review_rates(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """What a review threshold does on these rows: the share reviewed and the share of the errors
    (wrong labels) that review catches."""
    review = np.asarray(confidence, np.float64) < threshold
    wrong = ~np.asarray(correct, bool)
    errors = int(wrong.sum())
    caught = int((wrong & review).sum())
    return {
        "review_share": float(review.mean()) if len(review) else 0.0,
        "reviewed": int(review.sum()),
        "errors": errors,
        "errors_caught": caught,
        "error_catch_rate": caught / errors if errors else 1.0,
        "threshold": float(threshold),
    }


def line_decision(p_defect: float, threshold: float) -> str:
    return REJECT if p_defect >= threshold else PASS


def choose_decision(probs: np.ndarray, labels: np.ndarray, classes: list[str], normal_class: str | None,
                    max_escape_rate: float, review_fraction: float) -> dict[str, Any]:
    """The model's decision record, chosen on validation ``probs``/``labels``: the reject threshold
    for the escape target and the review threshold for the budget, with the rates they reach there."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    review_threshold = choose_review_threshold(confidence, review_fraction)
    record: dict[str, Any] = {
        "chosen_on": "val", "rows": int(len(labels)), "normal_class": normal_class,
        "max_escape_rate": float(max_escape_rate), "review_fraction": float(review_fraction),
        "review_threshold": review_threshold,
        "val_review": review_rates(confidence, probs.argmax(1) == np.asarray(labels), review_threshold),
    }
    if normal_class is None or normal_class not in classes:
        record["defect_threshold"] = None
        record["note"] = "no normal class: no line decision"
        return record
    p_defect, defect = defect_probability(probs, classes, normal_class), defect_truth(labels, classes, normal_class)
    record["defect_threshold"] = choose_defect_threshold(p_defect, defect, max_escape_rate)
    record["val_line"] = line_rates(p_defect, defect, record["defect_threshold"])
    if not defect.any():
        record["note"] = "no defective validation row: the reject threshold is 0.5"
    return record


def split_line_figures(probs: np.ndarray, labels: np.ndarray, classes: list[str], decision: dict[str, Any]) -> dict[str, Any]:
    """Escape/overkill at the recorded reject threshold, of the argmax labels, and the review figures,
    on one split's rows."""
    probs = np.asarray(probs, np.float64)
    out: dict[str, Any] = {}
    normal = decision.get("normal_class")
    if decision.get("defect_threshold") is not None and normal in classes:
        out["line"] = line_rates(defect_probability(probs, classes, normal), defect_truth(labels, classes, normal),
                                 decision["defect_threshold"])
        out["line_argmax"] = label_line_rates(probs.argmax(1), labels, classes, normal)
    if "review_threshold" in decision and len(probs):
        out["review"] = review_rates(probs.max(1), probs.argmax(1) == np.asarray(labels), decision["review_threshold"])
    return out
