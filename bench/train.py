"""Training benchmark: the same model, data and epochs as a bare single-process torch loop, on Ray Train
DDP with 2 workers and on Ray Train DeepSpeed (ZeRO-1) with 2 workers.

    python bench/train.py [--rows 455] [--epochs 6] [--finetune-epochs 4]

Data: a generated feature store with the offline models' widths (EfficientNet-Lite0 1280 x 49 tokens,
MiniLM 384 x 64 tokens, SmolLM2 576). Then the same three runs fine-tuning EfficientNet-Lite0's later
stages (train.finetune) from generated stride-16 maps, under ``finetune`` in the JSON. Writes
bench/results/train.json and bench/results/train.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def epoch_times_from_mlflow(config, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from ase_ray.tracking import tracking_uri

    history = MlflowClient(tracking_uri(config)).get_metric_history(run_id, "epoch_seconds")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=455)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    args = parser.parse_args()

    from ase_ray.config import load_config
    from ase_ray.ray_env import ensure_ray
    from ase_ray.testing import fake_feature_store

    work = Path(tempfile.mkdtemp(prefix="ase-ray-bench-train-"))
    classes = ("normal", "scratch", "particle", "void", "bridge")
    per_class = max(1, args.rows // len(classes))
    widths = {"text_dim": 384, "text_len": 64, "llm_dim": 576}
    fake_feature_store(work / "store", classes=classes, per_class=per_class, image_dim=1280, image_tokens=49, **widths)
    fake_feature_store(work / "stem_store", classes=classes, per_class=per_class, **widths,
                       image_encoder={"backend": "efficientnet-lite0", "image_size": 224})
    common = [f"project.work_dir={work}", "train.lr=1e-3", "train.num_workers=2"]
    ensure_ray(load_config(overrides=common).ray)
    payload = {"rows": args.rows, "epochs": args.epochs, "results": _measure(
        [*common, f"train.store_dir={work / 'store'}", f"train.epochs={args.epochs}"], work / "store", "cmaf")}
    payload["finetune"] = {"epochs": args.finetune_epochs, "results": _measure(
        [*common, f"train.store_dir={work / 'stem_store'}", f"train.epochs={args.finetune_epochs}",
         "train.model.kind=image_only", "train.pfa.enabled=false", "train.finetune.enabled=true"],
        work / "stem_store", "finetune")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(payload, indent=2))
    lines = [f"Training, {args.rows} rows, {args.epochs} epochs, CMAF + PFA, offline-model widths, 2-core CPU", ""]
    lines += _table(payload["results"])
    lines += ["", f"Fine-tuning EfficientNet-Lite0's blocks after the stride-16 map (224 px, 14x14x112 stems) with an "
              f"image-only head, {args.finetune_epochs} epochs, dihedral + mixup, BatchNorm frozen", ""]
    lines += _table(payload["finetune"]["results"])
    lines += ["", "Start-up = wall - epochs x s/epoch: worker start, data sharding, checkpoints, MLflow logging."]
    (RESULTS / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _measure(overrides: list[str], store: Path, tag: str) -> dict[str, dict]:
    """The bare loop (one process, 2 threads), then Ray Train DDP and DeepSpeed ZeRO-1 on 2 workers."""
    import torch

    from ase_ray.config import load_config
    from ase_ray.train.data import LABEL_KEY, load_task_arrays
    from ase_ray.train.fit import fit, with_image_tail
    from ase_ray.train.loop import run_epochs

    results: dict[str, dict] = {}
    config = load_config(overrides=overrides)
    splits, names = load_task_arrays(store, "multiclass")
    config, splits = with_image_tail(config, splits)
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    val = {**splits["val"].features, LABEL_KEY: splits["val"].labels}
    torch.set_num_threads(2)
    started = time.perf_counter()
    bare = run_epochs(train, val, config.train, names)
    results["bare torch loop (1 process)"] = _row(time.perf_counter() - started,
                                                  [h["epoch_seconds"] for h in bare.history])
    for name, strategy in (("Ray Train DDP (2 workers)", "ddp"), ("Ray Train DeepSpeed ZeRO-1 (2 workers)", "deepspeed")):
        cfg = load_config(overrides=[*overrides, f"train.strategy={strategy}", f"train.run_name=bench_{tag}_{strategy}"])
        started = time.perf_counter()
        result = fit(cfg)
        results[name] = _row(time.perf_counter() - started, epoch_times_from_mlflow(cfg, result.run_id))
    baseline = results["bare torch loop (1 process)"]
    for row in results.values():
        row["wall_ratio_vs_bare"] = round(row["wall_s"] / baseline["wall_s"], 2)
        row["epoch_ratio_vs_bare"] = round(row["epoch_s"] / baseline["epoch_s"], 2)
    return results


def _table(results: dict[str, dict]) -> list[str]:
    lines = ["| run | wall s | s/epoch (after start-up) | start-up s | wall vs bare | epoch vs bare |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['wall_s']} | {row['epoch_s']} | {row['startup_s']} | "
                     f"{row['wall_ratio_vs_bare']}x | {row['epoch_ratio_vs_bare']}x |")
    return lines


def _row(wall: float, epoch_seconds: list[float]) -> dict:
    steady = epoch_seconds[1:] or epoch_seconds
    per_epoch = sum(steady) / len(steady)
    return {"wall_s": round(wall, 2), "epoch_s": round(per_epoch, 3),
            "startup_s": round(wall - per_epoch * len(epoch_seconds), 2), "epochs_measured": len(epoch_seconds)}


if __name__ == "__main__":
    main()
