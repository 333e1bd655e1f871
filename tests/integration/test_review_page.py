"""The review page in a real headless Chromium, against Ray Serve on 127.0.0.1: upload an image and see
its prediction rendered, correct labels in the queue of an `ase-ray predict` output, see `/docs`
render its operations from assets this server ships; then the corrections table holds the rows and a
following `ase-ray train --corrections` takes them in.

Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); selenium drives the system
browser (no driver download)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ase_ray.cli import app
from ase_ray.config import load_config
from ase_ray.data.manifest import read_dataset_info
from ase_ray.data.synthetic import generate_synthetic
from ase_ray.features.inmemory import decode_image_bytes
from ase_ray.features.pipeline import apply_layout_hints, extract_features
from ase_ray.pipeline import split_dataset
from ase_ray.testing import register_untrained_model
from ase_ray.train.corrections import COLUMNS, corrections_path
from tests.integration.local_cluster import free_port

pytestmark = pytest.mark.integration

MODEL = "ase-ray-multiclass"
KEY_ENV = "ASE_RAY_TEST_UI_KEY"
KEY = "ui-test-key"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TINY = [
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
    "train.model.d_model=16", "train.model.heads=2", "train.model.head_hidden=16",
]
DECISION = {"chosen_on": "val", "normal_class": "normal", "defect_threshold": 0.5, "max_escape_rate": 0.05,
            "review_threshold": 0.99, "review_fraction": 0.1}

if not (CHROMIUM and DRIVER) and os.environ.get("CI") != "true":  # CI must have them: fail there, not skip
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def page(ray_session, tmp_path_factory):
    from ray import serve

    from ase_ray.serve.batch import predict_manifest
    from ase_ray.serve.deploy import deploy

    root = tmp_path_factory.mktemp("ui")
    overrides = [f"project.work_dir={root / 'work'}", *TINY, "data.synth.scale=0.05", "data.synth.seed=11",
                 f"serve.port={free_port()}", f"serve.api_key_env={KEY_ENV}", f"serve.review_queue={root / 'queue'}",
                 "serve.features.num_cpus=1", f"train.store_dir={root / 'store'}"]
    cfg = load_config(overrides=overrides)
    synth = generate_synthetic(cfg.data.synth, root / "synth")
    cfg = apply_layout_hints(cfg, read_dataset_info(root / "synth" / "manifest.csv"))
    split_manifest = split_dataset(cfg, root / "synth" / "manifest.csv", root / "split")
    extract_features(cfg, split_manifest, root / "store", track=False)
    store_rows = pd.read_parquet(root / "store" / "features.parquet")
    train_rows = store_rows[store_rows["split"] == "train"]

    # A board the store has never seen (another seed), in a lot of its own.
    other = generate_synthetic(cfg.data.synth.model_copy(update={"seed": 99, "scale": 0.01}), root / "other")
    queue = pd.DataFrame({"image_path": [*train_rows["image_path"].iloc[:2], other["image_path"].iloc[0]],
                          "group": [*train_rows["group"].iloc[:2], "new-lot"]})
    queue.to_csv(root / "queue.csv", index=False)

    decoded = [decode_image_bytes(Path(p).read_bytes()) for p in synth["image_path"][:2]]
    assert register_untrained_model(cfg, decoded, MODEL, alias="champion", decision=DECISION) == "1"
    predict_manifest(cfg, root / "queue.csv", root / "queue")
    os.environ[KEY_ENV] = KEY
    try:
        url = deploy(cfg, timeout_s=300)
    finally:
        os.environ.pop(KEY_ENV, None)
    yield {"url": url, "config": cfg, "root": root, "overrides": overrides, "queue": queue,
           "new_image": other["image_path"].iloc[0], "classes": [c.name for c in cfg.data.synth.classes]}
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _requested_hosts(driver) -> set[str]:
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return {u.split("/")[2] for u in urls if "://" in u}


def test_review_page_upload_queue_corrections_docs_and_train(page, browser):
    from selenium.webdriver.common.by import By

    url, classes = page["url"], page["classes"]
    host = url.split("/")[2]

    # --- upload an image, see the prediction rendered
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    _wait(browser, lambda d: "v1" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "files").send_keys(str(page["new_image"]))
    browser.find_element(By.ID, "classify").click()
    result = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))[0]
    assert result.find_element(By.CSS_SELECTOR, ".label").text in classes
    assert len(result.find_elements(By.CSS_SELECTOR, ".bar")) == len(classes)
    assert result.find_element(By.CSS_SELECTOR, ".decision").text in ("PASS", "REJECT")
    assert "pink dot" in result.text and "confidence" in result.text
    assert result.find_element(By.CSS_SELECTOR, "pre.ocr").text.strip()  # the OCR text of the printed board
    assert result.find_element(By.CSS_SELECTOR, "canvas").get_attribute("width") != "0"

    # --- the queue: every row, needs_review first; correct two labels
    browser.find_element(By.ID, "queue-load").click()
    rows = _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue tbody tr")) == 3
                 and d.find_elements(By.CSS_SELECTOR, "#queue tbody tr"))
    flags = [r.get_attribute("class") == "needs-review" for r in rows]
    assert flags == sorted(flags, reverse=True)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue tbody img")) == 3)  # thumbnails
    by_row = {int(r.get_attribute("data-row")): r for r in rows}
    new_row = 2  # row_id of the unseen board in queue.csv
    corrected = {}
    for row_id in (0, new_row):
        row = by_row[row_id]
        predicted = row.find_element(By.CSS_SELECTOR, "td.predicted").text
        label = next(c for c in classes if c != predicted)
        browser.execute_script("arguments[0].value = arguments[1]", row.find_element(By.CSS_SELECTOR, "select"), label)
        row.find_element(By.CSS_SELECTOR, "button.save-correction").click()
        _wait(browser, lambda d, r=row, lab=label: r.find_element(By.CSS_SELECTOR, ".saved").text == f"saved: {lab}")
        corrected[row_id] = (label, predicted)
    assert _requested_hosts(browser) <= {host}  # nothing from outside this server

    # --- the corrections table
    table_path = corrections_path(page["config"])
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    assert list(table.columns) == COLUMNS and len(table) == 2
    queue = page["queue"]
    for (row_id, (label, previous)), written in zip(corrected.items(), table.to_dict("records")):
        assert written["image_path"] == str(queue["image_path"][row_id])
        assert (written["label"], written["previous_label"], written["model_version"]) == (label, previous, "1")
        assert written["group"] == str(queue["group"][row_id]) and written["corrected_at"]

    # --- /docs renders its operations offline
    browser.get(f"{url}/docs")
    ops = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {o.text.replace("\u200b", "") for o in ops}
    assert {"/predict", "/predict/batch", "/review/queue"} <= paths
    assert _requested_hosts(browser) <= {host}

    # --- a following training takes the corrections in (the train-split image relabelled, the new one added)
    from ray import serve

    serve.shutdown()  # its replicas hold the CPUs the training workers need
    sets = [a for o in [*page["overrides"], "train.epochs=2", "train.num_workers=1", "train.pfa.enabled=false",
                        "train.model.kind=concat"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", "--corrections", *sets])
    assert result.exit_code == 0, result.output
    results_file = next(line.split("results: ")[1] for line in result.output.splitlines() if line.startswith("results: "))
    record = json.loads(Path(results_file).read_text())["corrections"]
    assert (record["relabelled"], record["added"], record["skipped"]) == (1, 1, {})
    assert set(record["used_image_ids"]) == set(table["image_id"])
