"""The numeric block: fields found and scaled on the training rows, missing indicators, identifiers out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ase_ray.models.numeric import CLIP, NumericBlock, fit_numeric_block, parse_ocr_fields


def ocr_rows(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        fields = {"LEN": round(float(rng.normal(10, 2)), 1), "ID": float(i), "DIFF": float(rng.integers(10, 30))}
        if i % 20 == 0:
            fields["RARE"] = 1.0  # on 5% of the rows: not a field of this data set
        if i % 4 == 0:
            del fields["LEN"]  # not read on a quarter of the rows: missing, not zero
        rows.append(json.dumps(fields))
    return rows


def test_fields_are_found_on_the_training_rows_and_identifiers_and_rare_keys_left_out():
    rows = ocr_rows(80)
    block = fit_numeric_block(rows, None, [], ["ocr"])
    assert [f.name for f in block.fields] == ["DIFF", "LEN"]
    assert "identifier" in block.skipped["ID"] and "5%" in block.skipped["RARE"]
    length = next(f for f in block.fields if f.name == "LEN")
    present = [json.loads(r)["LEN"] for r in rows if "LEN" in json.loads(r)]
    assert length.mean == pytest.approx(np.mean(present)) and length.std == pytest.approx(np.std(present))
    assert length.presence == pytest.approx(0.75)


def test_transform_scales_with_the_training_statistics_and_marks_missing_values():
    block = fit_numeric_block(ocr_rows(80), [{"temp": float(t)} for t in range(80)], ["temp"])
    names = [f.name for f in block.fields]
    assert names == ["DIFF", "LEN", "temp"] and block.width == 6
    new = [{"LEN": 12.0, "DIFF": "n/a"}, json.dumps({"LEN": 1e9}), "not json", {}]
    records = [{"temp": 39.5}, {"temp": None}, {"temp": "hot"}, {}]
    values = block.transform(new, records)
    assert values.shape == (4, 6) and values.dtype == np.float32
    by_name = {f.name: f for f in block.fields}
    assert values[0, 1] == pytest.approx((12.0 - by_name["LEN"].mean) / by_name["LEN"].std, rel=1e-5)
    assert values[0, 2] == pytest.approx(0.0, abs=1e-6)  # temp 39.5 is the training mean of 0..79
    assert values[1, 1] == CLIP  # far outside the training range: clipped
    # value columns are 0 and indicator columns 1 where a field is missing or not a number
    assert values[0, 3:].tolist() == [1.0, 0.0, 0.0]
    assert values[1, 3:].tolist() == [1.0, 0.0, 1.0]
    assert values[2].tolist() == [0.0] * 3 + [1.0] * 3 and values[3].tolist() == [0.0] * 3 + [1.0] * 3


def test_the_block_survives_its_json_record_and_the_sources_pick_what_it_holds():
    rows = ocr_rows(40)
    records = [{"temp": float(i % 9)} for i in range(40)]
    block = fit_numeric_block(rows, records, ["temp"])
    again = NumericBlock.from_json(json.loads(json.dumps(block.to_json())))
    assert again == block
    np.testing.assert_array_equal(again.transform(rows, records), block.transform(rows, records))
    assert [f.name for f in fit_numeric_block(rows, records, ["temp"], ["metadata"]).fields] == ["temp"]
    assert fit_numeric_block(rows, records, ["temp"], []).fields == []
    # a field that never changes on the training rows carries nothing
    flat = fit_numeric_block(rows, [{"temp": 3.0}] * 40, ["temp"], ["metadata"])
    assert flat.fields == [] and "never changes" in flat.skipped["temp"]


def test_ocr_fields_parse_from_json_text_or_a_dict():
    assert parse_ocr_fields('{"LEN": 2.0}') == {"LEN": 2.0} and parse_ocr_fields({"A": 1}) == {"A": 1}
    assert parse_ocr_fields("") == {} and parse_ocr_fields("[1, 2]") == {} and parse_ocr_fields(None) == {}


def test_training_fits_the_block_on_the_original_rows_not_their_tda_copies():
    import pandas as pd

    from ase_ray.data.metadata import MetadataColumns
    from ase_ray.train.data import Arrays, fit_numeric

    originals = ocr_rows(40)
    copies = originals[:30]  # TDA copies its source's text: the running id repeats
    rows = pd.DataFrame({"ocr_fields": originals + copies, "augmented": [False] * 40 + [True] * 30})
    train = Arrays({}, np.zeros(len(rows), dtype=np.int64), rows)
    block = fit_numeric(train, ["ocr"], MetadataColumns())
    assert "ID" in block.skipped and [f.name for f in block.fields] == ["DIFF", "LEN"]
    assert block == fit_numeric_block(originals, None, [], ["ocr"])
