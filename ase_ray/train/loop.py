"""The training loop: one strategy-agnostic epoch loop, run per Ray Train worker or in a bare process.

Progressive Feature Alignment (PFA), as run here, epoch by epoch:
1. ``progressive_schedule`` gives the subset size of every epoch: ``first_fraction`` of the (per
   worker) training set, growing by ``stride`` every ``epochs_per_stage`` epochs, ending on the full set.
2. Before an epoch whose subset is smaller than the set, every training sample's image-text
   self-similarity (cosine of the alignment embeddings) is recomputed with the current model, and
   ``select_subset`` keeps the most similar (``easy_first``) or least similar (``hard_first``), over
   the whole set or, with ``pfa.per_class``, the same share of each class.
3. The epoch trains on that subset, shuffled, with cross-entropy + ``align_weight`` x class-aware
   InfoNCE. With PFA disabled every epoch uses the whole set and cross-entropy only.

After every epoch the engine's fp32 weights (DeepSpeed's master copy under bf16) are scored on the
validation rows in fp32, the precision of the final scoring, and the best epoch is kept (``Best``). With
``train.average_epochs`` = N the kept model is instead the mean of the last N epochs' weights (stochastic
weight averaging), scored once after the last epoch (``averaged_val_*`` in that epoch's metrics).
Every epoch's checkpoint holds what a resume needs to continue exactly as an uninterrupted run: the
engine's state, each rank's random states, the epoch and the best epoch so far, and ``model/``, the
best epoch's fp32 export (what is logged, registered and served).

The loop is plain torch (no Ray): it runs on CUDA under a hand-made process group too.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ase_ray.models import inference
from ase_ray.models.augment import augment_batch
from ase_ray.models.classifier import build_model, compute_loss
from ase_ray.models.defect_maps import DEFECT_TARGET
from ase_ray.models.io import load_model, save_model
from ase_ray.models.pfa import self_similarity
from ase_ray.models.projections import dims_from_batch
from ase_ray.models.schedule import progressive_schedule, select_subset
from ase_ray.train.data import LABEL_KEY
from ase_ray.train.engine import make_engine
from ase_ray.train.metrics import classification_metrics, flat_metrics
from ase_ray.train.settings import TrainConfig

MODEL_DIR = "model"
LOOP_STATE_FILE = "loop_state.json"
AVERAGE_FILE = "weight_average.pt"
EVAL_BATCH = 64
BEST_RULE = ("highest val macro-F1; a tie goes to the lower val log-loss, then to the earlier epoch; "
             "with no validation rows, the last epoch")


@dataclass
class Best:
    """The epoch whose model is kept. ``val_macro_f1`` is None when there are no validation rows."""

    epoch: int
    val_macro_f1: float | None = None
    val_log_loss: float | None = None

    def beaten_by(self, other: "Best") -> bool:
        if other.val_macro_f1 is None or self.val_macro_f1 is None:
            return True  # no validation: the later epoch
        if not math.isclose(other.val_macro_f1, self.val_macro_f1, rel_tol=0, abs_tol=1e-12):
            return other.val_macro_f1 > self.val_macro_f1
        if not math.isclose(other.val_log_loss, self.val_log_loss, rel_tol=0, abs_tol=1e-12):
            return other.val_log_loss < self.val_log_loss
        return False  # a full tie keeps the earlier epoch


@dataclass
class LoopResult:
    module: torch.nn.Module  # the last epoch's (training) module
    history: list[dict[str, float]] = field(default_factory=list)
    best: Best | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the kept fp32 weights (rank 0): best epoch, or average
    average: "WeightAverage | None" = None  # rank 0, with train.average_epochs
    kept: torch.nn.Module | None = None  # rank 0, after the last epoch: an eval-mode model holding best_state


@dataclass
class WeightAverage:
    """The running sum of the fp32 weights of the epochs averaged so far (integer buffers, such as
    BatchNorm's batch counts, keep their latest value)."""

    total: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            value = value.detach().cpu()
            if value.is_floating_point() and key in self.total:
                self.total[key] += value.double()
            else:
                self.total[key] = value.double() if value.is_floating_point() else value.clone()
        self.count += 1

    def mean(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v / self.count).to(like[k].dtype) if v.is_floating_point() else v.clone()
                for k, v in self.total.items()}

    def save(self, path: Path) -> None:
        torch.save({"count": torch.tensor(self.count), **{f"total.{k}": v for k, v in self.total.items()}}, path)

    @classmethod
    def load(cls, path: Path) -> "WeightAverage":
        saved = torch.load(path, weights_only=True)
        return cls({k[len("total."):]: v for k, v in saved.items() if k.startswith("total.")}, int(saved["count"]))


def to_tensors(arrays: dict[str, np.ndarray], index: np.ndarray, device, float_dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in arrays.items():
        if key == LABEL_KEY:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(value[index]))
        out[key] = tensor.to(device=device, dtype=float_dtype if tensor.is_floating_point() else torch.long)
    return out


def predict_proba(module: torch.nn.Module, features: dict[str, np.ndarray], device=None) -> np.ndarray:
    """Class probabilities (N, C) in eval mode and fp32: Serve's computation, the label column left out."""
    return inference.predict_proba(module, {k: v for k, v in features.items() if k not in (LABEL_KEY, DEFECT_TARGET)},
                                   device)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12)))


def run_epochs(
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    cfg: TrainConfig,
    classes: list[str],
    *,
    rank: int = 0,
    device: torch.device | str = "cpu",
    restored_dir: Path | None = None,
    report: Callable[[dict[str, float], Path | None], None] | None = None,
    common_size: Callable[[int], int] = lambda n: n,
    common_counts: Callable[[np.ndarray], np.ndarray] = lambda counts: counts,
    inputs: dict[str, Any] | None = None,
) -> LoopResult:
    """Train for ``cfg.epochs`` epochs (from the restored epoch + 1 when resuming). Every rank calls
    it; with a process group up the engine wraps the model for it (DDP or DeepSpeed)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    labels = train[LABEL_KEY]
    n_local = len(labels)
    dims = dims_from_batch(to_tensors(train, np.arange(1), "cpu", torch.float32), cfg.model.text_sources)
    module = build_model(cfg.model, dims, len(classes), cfg.pfa)
    cell_counts = _cell_counts(train, len(classes), common_counts)
    if cell_counts is not None and module.defect_maps is not None:
        module.defect_maps.set_normal_class(int(np.argmax(cell_counts)))  # normal cells outnumber the rest
    engine = make_engine(module, cfg, device)
    with torch.random.fork_rng(devices=[]):  # the scoring copy must not move the training RNG
        scorer = build_model(cfg.model, dims, len(classes), cfg.pfa).to(engine.device).eval()
    pfa = cfg.pfa if cfg.pfa.enabled else None
    rng = np.random.default_rng(cfg.seed * 1000 + rank)
    result = LoopResult(engine.module)
    start_epoch = 0
    if restored_dir is not None:
        engine.load(restored_dir)
        start_epoch, result.best = read_loop_state(restored_dir)
        if rank == 0:
            result.best_state = load_model(restored_dir / MODEL_DIR)[0].state_dict()
            if (restored_dir / AVERAGE_FILE).is_file():
                result.average = WeightAverage.load(restored_dir / AVERAGE_FILE)
        restore_random_states(restored_dir, rank, rng, engine.device)  # last: building models draws from it
    n_common = common_size(n_local)  # every rank must take the same number of steps
    weights = class_weights(common_counts(np.bincount(labels, minlength=len(classes))), cfg.class_weighting)
    weights_t = torch.as_tensor(weights, dtype=torch.float32, device=engine.device) if weights is not None else None
    cell_weights_t = (torch.as_tensor(class_weights(cell_counts, "sqrt"), dtype=torch.float32, device=engine.device)
                      if cell_counts is not None else None)
    sizes = (
        progressive_schedule(n_common, cfg.pfa.first_fraction, cfg.pfa.stride, cfg.pfa.epochs_per_stage, cfg.epochs)
        if pfa else [n_common] * cfg.epochs
    )
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        engine.scale_lr(lr_factor(cfg, epoch))  # set from the epoch alone, so a resumed run follows it too
        subset = _epoch_subset(engine, train, sizes[epoch], n_local, pfa, cfg, rng)
        parts = _train_epoch(engine, train, subset, cfg, pfa, rng, weights_t, cell_weights_t)
        metrics = {"epoch": float(epoch), "subset_size": float(len(subset)),
                   "lr": float(engine.optimizer.param_groups[0]["lr"]), **parts}  # the rate the optimizer used
        state = engine.fp32_state_dict()  # a collective under DeepSpeed: every rank
        if rank == 0:
            scorer.load_state_dict(state)
            candidate = _score(scorer, val, classes, engine.device, epoch, metrics)
            if result.best is None or result.best.beaten_by(candidate):
                result.best = candidate
                result.best_state = {k: v.detach().cpu().clone() for k, v in state.items()}
            if cfg.average_epochs and epoch >= cfg.epochs - cfg.average_epochs:
                _average_in(result, state, scorer, val, classes, engine.device, epoch, metrics, cfg)
            metrics["best_epoch"] = float(result.best.epoch)
        metrics["epoch_seconds"] = time.perf_counter() - started
        result.history.append(metrics)
        if report is not None and (epoch + 1 == cfg.epochs or (epoch + 1) % cfg.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(engine, Path(tmp), epoch, rank, rng, cfg, dims, classes, result, inputs)
                report(metrics, Path(tmp))
        elif report is not None:
            report(metrics, None)
    if rank == 0 and result.best_state is not None:
        scorer.load_state_dict(result.best_state)
        result.kept = scorer.eval()
    return result


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The share of ``train.lr`` that epoch ``epoch`` (from 0) trains at (``train.lr_schedule``)."""
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return 1.0


def _average_in(result: LoopResult, state, scorer, val, classes, device, epoch: int, metrics: dict[str, float],
                cfg: TrainConfig) -> None:
    """Adds this epoch's weights to the average; after the last epoch the average becomes the kept model,
    scored on validation (``averaged_val_*``)."""
    if result.average is None:
        result.average = WeightAverage()
    result.average.add(state)
    metrics["averaged_epochs"] = float(result.average.count)
    if epoch + 1 < cfg.epochs:
        return
    averaged = result.average.mean(state)
    scorer.load_state_dict(averaged)
    scores: dict[str, float] = {}
    best = _score(scorer, val, classes, device, epoch, scores)
    metrics.update({f"averaged_{k}": v for k, v in scores.items() if k in ("val_macro_f1", "val_log_loss")})
    result.best, result.best_state = best, averaged


def _score(scorer, val, classes, device, epoch: int, metrics: dict[str, float]) -> Best:
    """Validation of the fp32 weights in fp32; adds val_* to ``metrics``."""
    if not len(val.get(LABEL_KEY, [])):
        return Best(epoch)
    probs = predict_proba(scorer, val, device)
    metrics.update(flat_metrics(classification_metrics(val[LABEL_KEY], probs.argmax(1), classes), "val_"))
    metrics["val_log_loss"] = log_loss(val[LABEL_KEY], probs)
    return Best(epoch, metrics["val_macro_f1"], metrics["val_log_loss"])


def _epoch_subset(engine, train, size, n_local, pfa, cfg, rng) -> np.ndarray:
    if pfa is None or size >= n_local:
        return rng.permutation(n_local)[:size]
    similarity = []
    with torch.no_grad(), engine.autocast():
        for start in range(0, n_local, EVAL_BATCH):
            index = np.arange(start, min(n_local, start + EVAL_BATCH))
            batch = to_tensors(train, index, engine.device, engine.float_dtype)
            similarity.append(self_similarity(engine.module, batch).float().cpu().numpy())
    labels = train[LABEL_KEY] if cfg.pfa.per_class else None
    return select_subset(np.concatenate(similarity), size, cfg.pfa.ordering, labels)


def class_weights(counts: np.ndarray, weighting: str) -> np.ndarray | None:
    """Per-class cross-entropy weights from the training class counts (None for ``none``); a class
    without training rows gets weight 0 (it contributes no term anyway)."""
    if weighting == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    raw = np.zeros_like(counts)
    raw[present] = counts.sum() / (present.sum() * counts[present])
    if weighting == "sqrt":
        raw = np.sqrt(raw)
    return raw * counts.sum() / float((raw * counts).sum())  # the average training row weighs 1


def _cell_counts(train: dict[str, np.ndarray], n_classes: int, common_counts) -> np.ndarray | None:
    """The training cells' class counts over all ranks (None without targets). Their square-root inverse
    frequencies weigh the cell loss: normal cells outnumber defect cells a hundredfold, and unweighted a
    defect map learns to say "normal" everywhere."""
    if DEFECT_TARGET not in train:
        return None
    targets = train[DEFECT_TARGET]
    counts = common_counts(np.bincount(targets[targets >= 0].ravel(), minlength=n_classes).astype(np.int64))
    return counts if counts.sum() > 0 else None


def _train_epoch(engine, train, subset, cfg, pfa, rng, weights=None, cell_weights=None) -> dict[str, float]:
    order = rng.permutation(subset)
    steps = math.ceil(len(order) / cfg.batch_size)
    totals: dict[str, float] = {}
    engine.model.train()
    for step in range(steps):
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = to_tensors(train, index, engine.device, engine.float_dtype)
        labels = torch.from_numpy(train[LABEL_KEY][index]).to(engine.device)
        mix = None
        if cfg.finetune.enabled or cfg.model.image_pooling == "defect_maps":  # defect maps: turns, no mixup
            batch, mix = augment_batch(batch, cfg.finetune.dihedral,
                                       cfg.finetune.mixup_alpha if cfg.finetune.enabled else 0.0, rng)
        targets = batch.pop(DEFECT_TARGET, None)
        with engine.autocast():
            outputs = engine.model(batch)
        loss, parts = compute_loss(outputs, labels, pfa, weights, mix, targets, cell_weights, cfg.defect_map_weight,
                                   cfg.label_smoothing, cfg.image_loss_weight)
        engine.backward_step(loss)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
    return {f"train_{k}": v / max(1, steps) for k, v in totals.items()}


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(engine, directory: Path, epoch: int, rank: int, rng: np.random.Generator,
                    cfg: TrainConfig, dims, classes, result: LoopResult, inputs: dict[str, Any] | None = None) -> None:
    """Every rank: the engine's state (to resume) and its own random states. Rank 0 also: the loop's
    state (epoch, best epoch) and ``model/``, the best epoch's fp32 export (to serve)."""
    engine.save(directory, rank)
    save_random_states(directory, rank, rng, engine.device)
    if rank == 0:
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            export = build_model(cfg.model, dims, len(classes), cfg.pfa)
        export.load_state_dict(result.best_state)
        save_model(export, directory / MODEL_DIR, cfg.model, dims, classes,
                   extra={"task": cfg.task, "epoch": result.best.epoch, "last_epoch": epoch,
                          "selection": _selection(cfg, epoch), "strategy": cfg.strategy,
                          "training_precision": _training_precision(cfg), "inputs": inputs or {}})
        (directory / LOOP_STATE_FILE).write_text(json.dumps({"epoch": epoch, "best": asdict(result.best)}))
        if result.average is not None:
            result.average.save(directory / AVERAGE_FILE)


def _selection(cfg: TrainConfig, epoch: int) -> str:
    if cfg.average_epochs and epoch + 1 == cfg.epochs:
        return f"the mean of the weights of the last {cfg.average_epochs} epochs (stochastic weight averaging)"
    return BEST_RULE


def _training_precision(cfg: TrainConfig) -> str:
    return cfg.deepspeed.precision if cfg.strategy == "deepspeed" else (
        "bf16 autocast" if cfg.autocast == "bf16" else "fp32")


def read_loop_state(directory: Path) -> tuple[int, Best]:
    """(the epoch to start from, the best epoch so far) of a checkpoint."""
    state = json.loads((directory / LOOP_STATE_FILE).read_text())
    return state["epoch"] + 1, Best(**state["best"])


def save_random_states(directory: Path, rank: int, rng: np.random.Generator, device: torch.device) -> None:
    """This rank's torch (and CUDA) generator states as tensors, numpy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(tensors, directory / f"rng_rank{rank}.pt")
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(rng.bit_generator.state))


def restore_random_states(directory: Path, rank: int, rng: np.random.Generator, device: torch.device) -> None:
    path = directory / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise RuntimeError(f"the checkpoint has no random state for rank {rank}: was it written with another "
                           "number of workers?")
    states = torch.load(path, weights_only=True)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    rng.bit_generator.state = json.loads((directory / f"rng_rank{rank}.json").read_text())


def _reduced_across_ranks(values: np.ndarray, device: torch.device | str, op: str) -> np.ndarray:
    """Integer ``values`` all-reduced over the ranks (``op``: ``MIN`` or ``SUM``); as they are without a
    process group. The tensor lives on the backend's device: NCCL only reduces CUDA tensors."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return np.asarray(values)
    tensor = torch.as_tensor(np.asarray(values), dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.cpu().numpy()


def smallest_across_ranks(n: int, device: torch.device | str) -> int:
    """The smallest ``n`` over all ranks (every rank must take the same number of steps)."""
    return int(_reduced_across_ranks(np.array([n]), device, "MIN")[0])


def summed_across_ranks(counts: np.ndarray, device: torch.device | str) -> np.ndarray:
    """``counts`` summed over all ranks (class counts of the whole training set, not of a shard)."""
    return _reduced_across_ranks(counts, device, "SUM")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["train"])
    classes = loop_config["classes"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()  # cuda:<local rank> with use_gpu, else cpu
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(loop_config.get("threads", 1))
    world = ray.train.get_context().get_world_size()
    # Each rank reads its own share of the training split from the store (ase_ray.train.data.take_share:
    # rows rank, rank + world, ... of the split); only rank 0 scores validation, so only it reads val.
    from ase_ray.train.data import take_share

    sources = loop_config["sources"]
    train = take_share(sources["train"], rank, world)
    val = take_share(sources["val"], 0, 1) if rank == 0 else {}
    logger = _EpochLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None

    def report(metrics: dict[str, float], directory: Path | None) -> None:
        if logger is not None:
            logger.log(metrics)
        # Every rank's files (its random states, its DeepSpeed shard) land in the one checkpoint.
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    restored = ray.train.get_checkpoint()
    with (restored.as_directory() if restored else nullcontext(None)) as restored_dir:
        run_epochs(train, val, cfg, classes, rank=rank, device=device,
                   restored_dir=Path(restored_dir) if restored_dir else None,
                   report=report, common_size=lambda n: smallest_across_ranks(n, device),
                   common_counts=lambda counts: summed_across_ranks(counts, device),
                   inputs=loop_config.get("inputs"))


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
