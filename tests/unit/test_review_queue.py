"""The review queue's rows and a correction's checks, without a server."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ase_ray.errors import RequestError
from ase_ray.serve.review import correction_record, parse_correction, queue_row, queue_rows, read_predictions


def _predictions():
    return pd.DataFrame({
        "row_id": [0, 1, 2, 3], "image_path": ["/a", "/b", "/c", "/d"], "image_id": ["a", "b", "c", ""],
        "predicted_label": ["ok", "crack", "ok", ""], "confidence": [0.95, 0.4, 0.55, np.nan],
        "needs_review": [False, True, True, True], "prob_ok": [0.95, 0.6, 0.55, np.nan],
        "prob_crack": [0.05, 0.4, 0.45, np.nan], "error": ["", "", "", "decode: broken"],
        "model_version": ["3"] * 4,
    })


def test_needs_review_first_then_rising_confidence_with_the_latest_correction():
    corrections = pd.DataFrame({"image_id": ["c"], "label": ["crack"]})
    rows = queue_rows(_predictions(), corrections, max_rows=10)
    assert [r["row_id"] for r in rows] == [3, 1, 2, 0]  # a failed row (no confidence) first of all
    assert rows[2]["corrected_label"] == "crack" and rows[0]["corrected_label"] is None
    assert rows[1]["probabilities"] == {"ok": 0.6, "crack": 0.4}
    assert rows[0]["confidence"] is None  # NaN is not JSON
    assert len(queue_rows(_predictions(), corrections, max_rows=2)) == 2


def test_a_correction_names_a_class_of_the_model_and_a_row_of_the_queue(tmp_path):
    predictions = _predictions()
    record = correction_record(queue_row(predictions, 1), "ok", ["ok", "crack"], tmp_path)
    assert (record["label"], record["previous_label"], record["model_version"]) == ("ok", "crack", "3")
    with pytest.raises(RequestError, match="not one of the model's classes") as bad:
        correction_record(queue_row(predictions, 1), "dent", ["ok", "crack"], tmp_path)
    assert bad.value.status == 400
    with pytest.raises(RequestError) as missing:
        queue_row(predictions, 9)
    assert missing.value.status == 404
    with pytest.raises(RequestError, match="no image_id"):
        correction_record(queue_row(predictions, 3), "ok", ["ok", "crack"], tmp_path)
    assert parse_correction(b'{"row_id": 2, "label": "ok"}') == (2, "ok")
    for body in (b"[1]", b'{"row_id": "2", "label": "ok"}', b'{"row_id": true, "label": "ok"}', b"{oops"):
        with pytest.raises(RequestError) as err:
            parse_correction(body)
        assert err.value.status == 400
    with pytest.raises(RequestError, match="no review queue is configured"):
        read_predictions(None)
    with pytest.raises(RequestError, match="has no predictions.parquet"):
        read_predictions(tmp_path)
