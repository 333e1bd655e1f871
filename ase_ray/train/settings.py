"""Config section of training (light: pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ase_ray.config_base import StrictModel
from ase_ray.models.settings import ModelSettings, PfaSettings


class DeepSpeedSettings(StrictModel):
    zero_stage: int = Field(1, ge=0, le=3, description="ZeRO stage: 0-2 on CPU, 2-3 on GPU.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 needs a GPU.")
    gradient_clipping: float = Field(1.0, ge=0)


class FinetuneSettings(StrictModel):
    """Fine-tuning the image encoder's stages after the stride-16 map, jointly with the fusion and heads,
    from the cached frozen early stages (the store's ``image_stem``: extract with
    ``features.image_encoder.stem: true``). Guards against overfitting a few hundred images: BatchNorm
    statistics frozen, a lower learning rate for the encoder, dihedral and mixup augmentation, the epoch
    picked on validation."""

    enabled: bool = False
    lr_scale: float = Field(0.1, gt=0, le=1, description="The encoder's learning rate is train.lr x lr_scale.")
    dihedral: bool = Field(True, description="Turn each batch's stem maps by a random flip or quarter turn.")
    mixup_alpha: float = Field(0.2, ge=0, le=10, description="Mixup of the image inputs, lambda ~ Beta(a, a); "
                               "0: off.")


class TrainConfig(StrictModel):
    """Training of PFA/CMAF on Ray Train. Defaults follow the paper (AdamW, batch 10, 60 epochs) except lr."""

    task: Literal["binary", "multiclass"] = "multiclass"
    store_dir: str | None = Field(None, description="Feature store, a path or a URI (None: where `ase-ray features` "
                                  "writes by default, features.out_dir).")
    model: ModelSettings = Field(default_factory=ModelSettings)
    pfa: PfaSettings = Field(default_factory=PfaSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    defect_map_weight: float = Field(
        1.0, ge=0, le=100, description="model.image_pooling defect_maps: weight of the per-cell loss against the "
        "pixel masks (ase_ray.models.defect_maps) beside the image's cross-entropy; 0: image labels only.")
    average_epochs: int = Field(
        0, ge=0, description="Stochastic weight averaging (Izmailov et al. 2018): the kept model is the mean of "
        "the weights (and BatchNorm statistics) after each of the last this many epochs, scored on validation "
        "once at the end, instead of the best single epoch; 0: the best epoch. A few hundred images make the "
        "single epochs' models, and the choice among them on a small validation split, noisy.")
    image_loss_weight: float = Field(
        0.0, ge=0, le=100, description="model.image_logits: weight of a second cross-entropy on the image head's "
        "own logits beside that of the sum, so the image branch keeps learning to decide alone (as the image-only "
        "variant does) while the text branch learns its correction; 0: the sum's loss only.")
    use_augmented: bool = Field(True, description="Train on TDA-synthesised rows too.")
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(
        0.5, gt=0, description="Leave CPUs free for Ray Data: 2 workers x 0.5 on a 2-core machine."
    )
    use_gpu: bool = False
    autocast: Literal["none", "bf16"] = Field(
        "none", description="ddp strategy: bf16 autocast of the forward pass (weights stay fp32). DeepSpeed "
        "has its own: deepspeed.precision."
    )
    lr: float = Field(
        1e-3, gt=0, description="The paper used 1e-2; CMAF did not fit at 1e-2 here (train CE stuck at ~1.5)."
    )
    weight_decay: float = Field(0.01, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant: train.lr every epoch; cosine: epoch e of E trains at lr x "
        "(1 + cos(pi e / E)) / 2, from lr down to nearly 0 at the last epoch (Loshchilov and Hutter 2017, without "
        "restarts), so the last epochs settle instead of moving the weights at full rate. A fine-tuned encoder's "
        "lower rate follows it.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing of the image's cross-entropy (not of the defect-map "
        "cells): the target puts this much of its mass evenly on every class; 0: one-hot targets.")
    class_weighting: Literal["none", "sqrt", "balanced"] = Field(
        "none", description="Cross-entropy class weights from the training rows' class counts: balanced "
        "n / (C n_c); sqrt, its square root (gentler: a 30x rarer class weighs about 5.5x as much); none: all "
        "1. Scaled so that the average training row weighs 1.")
    calibrate: bool = Field(
        True, description="Fit a temperature on the validation split after training (ase_ray.models.calibration): "
        "the served probabilities, and needs_review, then mean what they say.")
    corrections: bool = Field(
        False, description="Take the review page's corrections table (serve.corrections_path) into the training "
        "rows (ase_ray.train.corrections): never into validation or test, nor an image whose group is there.")
    batch_size: int = Field(10, ge=1, description="Per-worker batch size.")
    epochs: int = Field(60, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker failures survived (restart from the last checkpoint).")
    run_name: str = Field(
        "train", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Prefix of each run's name: every `ase-ray train` is a new run <run_name>-<time>-<id> "
        "(`--resume` continues one)."
    )
    seed: int = 0
    storage_path: str | None = Field(
        None, description="Ray Train results, a path or a URI (None: <storage_uri or work_dir>/ray_results)."
    )
    checkpoints_to_keep: int = Field(2, ge=1)
    checkpoint_every: int = Field(
        1, ge=1, description="Epochs between checkpoints (the last epoch always has one); metrics are logged "
        "every epoch. A restart after a failure repeats at most this many epochs less one. Raise it where a "
        "checkpoint is costly (a large model, remote storage)."
    )

    @model_validator(mode="after")
    def _check_precision(self) -> "TrainConfig":
        if self.strategy == "deepspeed" and self.deepspeed.precision == "fp16" and not self.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs use_gpu=true; use fp32 or bf16 on CPU")
        if self.strategy == "deepspeed" and self.deepspeed.precision != "fp32" and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.precision bf16/fp16 needs deepspeed.zero_stage >= 1 (stage 0 keeps no "
                             "fp32 master weights to export)")
        if self.average_epochs > self.epochs:
            raise ValueError(f"train.average_epochs ({self.average_epochs}) is more than train.epochs ({self.epochs})")
        if self.autocast != "none" and self.strategy != "ddp":
            raise ValueError("train.autocast is for the ddp strategy; DeepSpeed uses deepspeed.precision")
        return self


ABLATION_VARIANTS = ("image-only", "text-only", "+numeric block", "+metadata", "concat", "gated", "+CMAF", "+PFA",
                     "+TDA", "full (PFA+CMAF+TDA)")


class AblateConfig(StrictModel):
    """``ase-ray ablate``: k-fold x seeds for every variant; training settings come from ``train``."""

    folds: int = Field(3, ge=2)
    seeds: int = Field(2, ge=1)
    first_seed: int = Field(0, ge=0, description="Training seeds are first_seed, first_seed + 1, ... (seeds of "
                            "them): more seeds of a setting without rerunning the ones already measured.")
    tasks: list[Literal["binary", "multiclass"]] = Field(default_factory=lambda: ["binary", "multiclass"])
    variants: list[str] = Field(default_factory=lambda: list(ABLATION_VARIANTS))
    cpus_per_run: float = Field(1.0, gt=0, description="Ray CPUs per training run (runs go in parallel).")
