"""Two training engines behind one interface: plain torch (DDP under Ray Train) and DeepSpeed.

An engine owns the wrapped model and the optimizer, takes a loss through ``backward_step``, and saves
/ restores its full training state into a checkpoint folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ase_ray.train.settings import TrainConfig

TORCH_STATE = "train_state.pt"
DEEPSPEED_TAG = "deepspeed"


class TorchEngine:
    """AdamW on a plain module; under Ray Train with several workers the module is wrapped in DDP."""

    float_dtype = torch.float32

    def __init__(self, module: nn.Module, cfg: TrainConfig, distributed: bool):
        self.cfg = cfg
        self.module = module
        if distributed:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(module)
        else:
            self.model = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.deepspeed.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.deepspeed.gradient_clipping)
        self.optimizer.step()

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, directory / TORCH_STATE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / TORCH_STATE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, module: nn.Module, cfg: TrainConfig):
        # The CPU shared-memory comm op is only used for inference all-reduce; building it JIT-compiles
        # for 75-100 s. Skip it (importlib: `deepspeed.comm` re-exports a different `torch`).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        self.cfg = cfg
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.module = self.model.module
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def save(self, directory: Path, rank: int) -> None:
        self.model.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)  # a collective: every rank

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.deepspeed.zero_stage == 3:  # parameters are partitioned: gather (collective)
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()


def make_engine(module: nn.Module, cfg: TrainConfig, distributed: bool):
    if cfg.strategy == "deepspeed":
        if not distributed:
            raise ValueError("the deepspeed strategy runs under Ray Train (or with RANK/WORLD_SIZE set)")
        return DeepSpeedEngine(module, cfg)
    return TorchEngine(module, cfg, distributed)
