"""The training loop: one strategy-agnostic epoch loop, run per Ray Train worker or in a bare process.

Progressive Feature Alignment (PFA), as run here, epoch by epoch:
1. ``progressive_schedule`` gives the subset size of every epoch: ``first_fraction`` of the (per
   worker) training set, growing by ``stride`` every ``epochs_per_stage`` epochs, ending on the full set.
2. Before an epoch whose subset is smaller than the set, every training sample's image-text
   self-similarity (cosine of the alignment embeddings) is recomputed with the current model, and
   ``select_subset`` keeps the most similar (``easy_first``) or least similar (``hard_first``).
3. The epoch trains on that subset, shuffled, with cross-entropy + ``align_weight`` x class-aware
   InfoNCE. With PFA disabled every epoch uses the whole set and cross-entropy only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ase_ray.models.classifier import build_model, compute_loss
from ase_ray.models.io import load_model, save_model
from ase_ray.models.pfa import self_similarity
from ase_ray.models.projections import dims_from_batch
from ase_ray.models.schedule import progressive_schedule, select_subset
from ase_ray.train.data import LABEL_KEY
from ase_ray.train.engine import make_engine
from ase_ray.train.metrics import classification_metrics, flat_metrics
from ase_ray.train.settings import TrainConfig

MODEL_DIR = "model"
EPOCH_FILE = "epoch.json"
EVAL_BATCH = 64


@dataclass
class LoopResult:
    module: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def to_tensors(arrays: dict[str, np.ndarray], index: np.ndarray, device, float_dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in arrays.items():
        if key == LABEL_KEY:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(value[index]))
        out[key] = tensor.to(device=device, dtype=float_dtype if tensor.is_floating_point() else torch.long)
    return out


@torch.no_grad()
def predict_proba(module: torch.nn.Module, features: dict[str, np.ndarray], device="cpu",
                  float_dtype=torch.float32) -> np.ndarray:
    """Class probabilities (N, C) in eval mode, batched."""
    n = len(next(iter(v for k, v in features.items() if k != LABEL_KEY)))
    was_training = module.training
    module.eval()
    chunks = []
    try:
        for start in range(0, n, EVAL_BATCH):
            index = np.arange(start, min(n, start + EVAL_BATCH))
            logits = module(to_tensors(features, index, device, float_dtype))["logits"]
            chunks.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, getattr(module, "num_classes", 0)), np.float32)


def run_epochs(
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    cfg: TrainConfig,
    classes: list[str],
    *,
    rank: int = 0,
    distributed: bool = False,
    restored_dir: Path | None = None,
    report: Callable[[dict[str, float], Path | None], None] | None = None,
    common_size: Callable[[int], int] = lambda n: n,
) -> LoopResult:
    """Train for ``cfg.epochs`` epochs (from the restored epoch + 1 when resuming)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    labels = train[LABEL_KEY]
    n_local = len(labels)
    dims = dims_from_batch(to_tensors(train, np.arange(1), "cpu", torch.float32), cfg.model.text_sources)
    module = build_model(cfg.model, dims, len(classes), cfg.pfa)
    engine = make_engine(module, cfg, distributed)
    pfa = cfg.pfa if cfg.pfa.enabled else None
    start_epoch = 0
    if restored_dir is not None:
        engine.load(restored_dir)
        start_epoch = json.loads((restored_dir / EPOCH_FILE).read_text())["epoch"] + 1
    n_common = common_size(n_local)  # every rank must take the same number of steps
    sizes = (
        progressive_schedule(n_common, cfg.pfa.first_fraction, cfg.pfa.stride, cfg.pfa.epochs_per_stage, cfg.epochs)
        if pfa else [n_common] * cfg.epochs
    )
    rng = np.random.default_rng(cfg.seed * 1000 + rank)
    result = LoopResult(engine.module)
    for epoch in range(start_epoch, cfg.epochs):
        _maybe_inject_fault(cfg, epoch, rank, start_epoch)
        started = time.perf_counter()
        subset = _epoch_subset(engine, train, sizes[epoch], n_local, pfa, cfg, rng)
        parts = _train_epoch(engine, train, subset, cfg, pfa, rng)
        metrics = {"epoch": float(epoch), "subset_size": float(len(subset)), **parts,
                   "epoch_seconds": time.perf_counter() - started}
        if len(val.get(LABEL_KEY, [])):
            probs = predict_proba(engine.module, val, engine.device, engine.float_dtype)
            scores = classification_metrics(val[LABEL_KEY], probs.argmax(1), classes)
            metrics.update(flat_metrics(scores, "val_"))
        result.history.append(metrics)
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(engine, Path(tmp), epoch, rank, cfg, dims, classes)
                report(metrics, Path(tmp))
    return result


def _maybe_inject_fault(cfg: TrainConfig, epoch: int, rank: int, start_epoch: int) -> None:
    """Testing hook: kill this process once, on the first attempt, to exercise worker restarts."""
    if cfg.fault_injection_epoch is not None and rank == 0 and start_epoch == 0 and epoch == cfg.fault_injection_epoch:
        os._exit(17)


def _epoch_subset(engine, train, size, n_local, pfa, cfg, rng) -> np.ndarray:
    if pfa is None or size >= n_local:
        return rng.permutation(n_local)[:size]
    similarity = []
    for start in range(0, n_local, EVAL_BATCH):
        index = np.arange(start, min(n_local, start + EVAL_BATCH))
        batch = to_tensors(train, index, engine.device, engine.float_dtype)
        similarity.append(self_similarity(engine.module, batch).float().cpu().numpy())
    return select_subset(np.concatenate(similarity), size, cfg.pfa.ordering)


def _train_epoch(engine, train, subset, cfg, pfa, rng) -> dict[str, float]:
    order = rng.permutation(subset)
    steps = math.ceil(len(order) / cfg.batch_size)
    totals: dict[str, float] = {}
    engine.model.train()
    for step in range(steps):
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = to_tensors(train, index, engine.device, engine.float_dtype)
        labels = torch.from_numpy(train[LABEL_KEY][index]).to(engine.device)
        loss, parts = compute_loss(engine.model(batch), labels, pfa)
        engine.backward_step(loss)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
    return {f"train_{k}": v / max(1, steps) for k, v in totals.items()}


def save_checkpoint(engine, directory: Path, epoch: int, rank: int, cfg: TrainConfig, dims, classes) -> None:
    """The engine's full state (to resume) plus ``model/`` in the portable save format (to serve)."""
    engine.save(directory, rank)
    state = engine.full_state_dict()  # a collective under ZeRO-3: every rank calls it
    if rank == 0:
        export = build_model(cfg.model, dims, len(classes), cfg.pfa)
        export.load_state_dict({k: v.float() for k, v in state.items()})
        save_model(export, directory / MODEL_DIR, cfg.model, dims, classes,
                   extra={"task": cfg.task, "epoch": epoch, "strategy": cfg.strategy})
        (directory / EPOCH_FILE).write_text(json.dumps({"epoch": epoch}))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import torch.distributed as dist

    cfg = TrainConfig.model_validate(loop_config["train"])
    classes = loop_config["classes"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(loop_config.get("threads", 1))
    train = _collect(ray.train.get_dataset_shard("train"))
    val = _collect(ray.train.get_dataset_shard("val"))
    logger = _EpochLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None

    def common_size(n: int) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return n
        value = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    def report(metrics: dict[str, float], directory: Path | None) -> None:
        if logger is not None:
            logger.log(metrics)
        with_checkpoint = directory is not None and (rank == 0 or cfg.strategy == "deepspeed")
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if with_checkpoint else None
        ray.train.report(metrics, checkpoint=checkpoint)

    restored = ray.train.get_checkpoint()
    with (restored.as_directory() if restored else nullcontext(None)) as restored_dir:
        run_epochs(train, val, cfg, classes, rank=rank, distributed=True,
                   restored_dir=Path(restored_dir) if restored_dir else None,
                   report=report, common_size=common_size)


def _collect(shard) -> dict[str, np.ndarray]:
    import ray.data

    from ase_ray.train.data import collect_shard

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch per worker is noise
    return collect_shard(shard) if shard is not None else {}


class _EpochLogger:
    """Rank 0 logs per-epoch metrics into the run the driver opened (the same run after a restart)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.run_id = run_id

    def log(self, metrics: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        step = int(metrics["epoch"])
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)


def load_checkpoint_model(checkpoint_dir: str | Path):
    return load_model(Path(checkpoint_dir) / MODEL_DIR)
