"""Load benchmark of the Serve endpoint over real HTTP on 127.0.0.1 (run by hand, not a test).

    python bench/serve_load.py [--backends tiny|offline] [--requests 96] [--concurrency 1,8,32]

Starts a local Ray, registers an untrained classifier with the right input widths in a temporary
SQLite MLflow (the classifier's cost is negligible next to the feature backends), deploys the app
with dynamic batching on (``--batch-size``, default 8) and off (max_batch_size 1), and at each
concurrency runs a bounded number of POST /predict requests from that many client threads (each
thread sends its next request when the previous one is answered). Reports p50/p95/p99 latency and
requests/s; writes ``bench/results/serve.json`` and ``serve.md``.

Backends: ``tiny`` (default; real tesseract OCR, tiny random describer/LLM/encoders: the serving
path with small models) or ``offline`` (the default offline models: measuring describer, SmolLM2,
EfficientNet-Lite0, MiniLM; several times slower per image, use fewer requests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = [
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
]
RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(args, work: Path, batch_size: int, port: int):
    from ase_ray.config import load_config

    overrides = [f"project.work_dir={work}", "data.synth.scale=0.05", "data.synth.seed=11", f"serve.port={port}",
                 f"serve.batching.max_batch_size={batch_size}",
                 "serve.api_key_env=ASE_RAY_BENCH_UNUSED_KEY", f"serve.features.max_ongoing_requests={args.max_ongoing}",
                 f"serve.ingress.max_ongoing_requests={args.max_ongoing * 2}"]
    if args.wait is not None:
        overrides.append(f"serve.batching.batch_wait_timeout_s={args.wait}")
    if args.backends == "tiny":
        overrides += TINY
    return load_config(overrides=overrides + list(args.set or []))


def prepare(args, work: Path):
    """Synthetic images and a registered model for the chosen backends; returns (config, image bytes)."""
    from ase_ray.data.manifest import read_dataset_info
    from ase_ray.data.synthetic import generate_synthetic
    from ase_ray.features.inmemory import decode_image_bytes
    from ase_ray.features.pipeline import apply_layout_hints
    from ase_ray.testing import register_untrained_model

    cfg = make_config(args, work, args.batch_size, 8000)
    synth = generate_synthetic(cfg.data.synth, work / "synth")
    images = [Path(p).read_bytes() for p in synth["image_path"][: args.images]]
    cfg = apply_layout_hints(cfg, read_dataset_info(work / "synth" / "manifest.csv"))
    register_untrained_model(cfg, [decode_image_bytes(b) for b in images[:2]], "ase-ray-multiclass",
                             out_dir=work / "model")
    return cfg, images


def extractor_in_process(cfg, images: list[bytes], batch: int, n: int = 16) -> float:
    """ms per image of the feature stages alone, in this process (no Serve, no HTTP): what batching
    saves in the extraction itself when nothing else competes for the cores."""
    from ase_ray.features.inmemory import FeatureExtractor, decode_image_bytes
    from ase_ray.serve.predictor import serving_features

    extractor = FeatureExtractor(serving_features(cfg.features, None, cfg.serve.features)).load()
    decoded = [decode_image_bytes(images[i % len(images)]) for i in range(n)]
    extractor(decoded[:2])
    started = time.perf_counter()
    for i in range(0, n, batch):
        extractor(decoded[i:i + batch])
    return round((time.perf_counter() - started) / n * 1000, 1)


def run_level(url: str, images: list[bytes], concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` closed-loop client threads."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker():
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                try:
                    r = http.post("/predict", files={"file": (f"{index}.png", images[index % len(images)], "image/png")})
                    ok = r.status_code == 200
                    detail = "" if ok else f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if ok else errors).append(elapsed if ok else detail)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "requests": total, "ok": len(latencies), "errors": len(errors),
        "error_sample": errors[:3], "wall_s": round(wall, 2), "req_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1),
    }


def bench_mode(args, cfg_base, images, batch_size: int, port: int, echo) -> list[dict]:
    from ase_ray.serve.deploy import deploy

    cfg = cfg_base.model_copy(update={"serve": cfg_base.serve.model_copy(update={
        "port": port, "batching": cfg_base.serve.batching.model_copy(update={"max_batch_size": batch_size})})})
    started = time.perf_counter()
    url = deploy(cfg, timeout_s=900)
    echo(f"  deployed max_batch_size={batch_size} in {time.perf_counter() - started:.1f} s")
    run_level(url, images, 2, args.warmup)  # warm-up: first requests pay lazy initialisation
    rows = []
    for c in args.concurrency:
        total = args.requests_c1 if c == 1 else max(args.requests, 2 * c)
        row = {"batching": "on" if batch_size > 1 else "off", "max_batch_size": batch_size, **run_level(url, images, c, total)}
        echo(f"  c={c:>3}: {row['req_per_s']:6.2f} req/s  p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
             f"p99 {row['p99_ms']:7.1f} ms  ({row['ok']} ok, {row['errors']} errors)")
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> dict:
    by = {(r["batching"], r["concurrency"]): r for r in rows}
    out = {}
    for c in sorted({r["concurrency"] for r in rows if r["concurrency"] >= 8}):
        on, off = by.get(("on", c)), by.get(("off", c))
        if on and off and off["req_per_s"]:
            out[f"batching_speedup_c{c}"] = round(on["req_per_s"] / off["req_per_s"], 2)
    if ("on", 8) in by:
        out["p99_over_p50_c8_batching_on"] = round(by[("on", 8)]["p99_ms"] / by[("on", 8)]["p50_ms"], 2)
    if ("off", 8) in by:
        out["p99_over_p50_c8_batching_off"] = round(by[("off", 8)]["p99_ms"] / by[("off", 8)]["p50_ms"], 2)
    speedups = [v for k, v in out.items() if k.startswith("batching_speedup")]
    out["met_batching_1_5x"] = bool(speedups) and all(v >= 1.5 for v in speedups)
    out["met_p99_1_5x_p50_c8"] = out.get("p99_over_p50_c8_batching_on", 99) <= 1.5
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Serve load benchmark, {m['date']}, {m['cpus']} CPUs, backends `{m['backends']}`, "
        f"POST /predict of {m['image_size']} PNGs over HTTP on 127.0.0.1, closed-loop clients, "
        f"batch_wait_timeout_s {m['batch_wait_timeout_s']}, ocr_parallel {m['ocr_parallel']}, "
        f"load average before/after {m['loadavg_1m_before_after']}.",
        "",
        "| batching | max_batch_size | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(f"| {r['batching']} | {r['max_batch_size']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['req_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    t = result["targets"]
    lines += ["", "Targets: " + ", ".join(f"{k} = {v}" for k, v in t.items()),
              "", "Feature stages alone in the benchmark process (no Serve, no HTTP), ms per image: "
              + ", ".join(f"{k} = {v}" for k, v in result["features_in_process"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", choices=["tiny", "offline"], default="tiny")
    p.add_argument("--requests", type=int, default=96, help="Requests per level at concurrency > 1.")
    p.add_argument("--requests-c1", type=int, default=32, help="Requests at concurrency 1.")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--batch-size", type=int, default=8, help="max_batch_size with batching on.")
    p.add_argument("--wait", type=float, default=None, help="batch_wait_timeout_s (default: the config's).")
    p.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests of Features.")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--set", action="append", help="Extra config override a.b.c=value.")
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    from ray import serve

    from ase_ray.config import RayConfig
    from ase_ray.ray_env import ensure_ray

    echo = lambda text: print(text, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ase_ray_serve_bench_"))
    started = time.perf_counter()
    cfg, images = prepare(args, work)
    echo(f"prepared {len(images)} images and a model ({args.backends} backends) in {time.perf_counter() - started:.0f} s")
    in_process = {f"batch_{b}_ms_per_image": extractor_in_process(cfg, images, b) for b in (1, args.batch_size)}
    echo(f"feature stages in this process (no HTTP): {in_process}")
    ensure_ray(RayConfig(log_to_driver=False))
    port = free_port()
    rows = []
    try:
        for batch_size in (args.batch_size, 1):
            echo(f"batching {'on' if batch_size > 1 else 'off'} (max_batch_size={batch_size})")
            rows += bench_mode(args, cfg, images, batch_size, port, echo)
    finally:
        serve.shutdown()
    from PIL import Image
    import io

    width, height = Image.open(io.BytesIO(images[0])).size
    result = {
        "meta": {"date": date.today().isoformat(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 "backends": args.backends, "image_size": f"{width}x{height}", "warmup": args.warmup,
                 "batch_wait_timeout_s": cfg.serve.batching.batch_wait_timeout_s,
                 "ocr_parallel": cfg.serve.features.ocr_parallel,
                 "total_s": round(time.perf_counter() - started, 1),
                 "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "results": rows,
        "features_in_process": in_process,
        "targets": targets(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    echo(markdown(result))
    echo(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
