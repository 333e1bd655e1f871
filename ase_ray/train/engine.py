"""Two training engines behind one interface: plain torch (DDP when a process group is up) and DeepSpeed.

An engine owns the wrapped model and the optimizer, takes a loss through ``backward_step``, saves /
restores its full training state into a checkpoint folder, and hands out the fp32 weights (what is
validated, exported and served, whatever precision it trains in). Plain torch only: no Ray here, so
the loop runs the same under Ray Train, under a hand-made process group and in a bare process.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ase_ray.torch_threads import respect_omp_thread_limit
from ase_ray.train.settings import TrainConfig

TORCH_STATE = "train_state.pt"
DEEPSPEED_TAG = "deepspeed"


def process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class TorchEngine:
    """AdamW on a plain module on ``device``; wrapped in DDP when a process group is up. bf16 autocast
    around the forward pass when ``train.autocast`` is bf16 (the weights stay fp32)."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.module = module.to(device)
        self.device = device
        if process_group_up():
            ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module
        self.optimizer = torch.optim.AdamW(parameter_groups(module, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.float_dtype = torch.float32  # inputs; autocast picks the compute dtype per op

    def scale_lr(self, factor: float) -> None:
        scale_groups(self.optimizer, self.base_lrs, factor)

    def autocast(self):
        if self.cfg.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

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

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() if v.is_floating_point() else v.detach()
                for k, v in self.module.state_dict().items()}


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
    """DeepSpeed over the process group that is up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, module: nn.Module, cfg: TrainConfig):
        # The CPU shared-memory comm op is only used for inference all-reduce; building it JIT-compiles
        # for 75-100 s. Skip it (importlib: `deepspeed.comm` re-exports a different `torch`).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        self.cfg = cfg
        optimizer = torch.optim.AdamW(parameter_groups(module, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.module = self.model.module
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def autocast(self):
        return nullcontext()  # DeepSpeed casts the model itself (deepspeed.precision)

    def scale_lr(self, factor: float) -> None:
        scale_groups(self.optimizer, self.base_lrs, factor)  # DeepSpeed's optimizer mirrors the torch groups

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def save(self, directory: Path, rank: int) -> None:
        self.model.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)  # a collective: every rank

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's fp32 master weights (not the bf16/fp16 copy the model computes with),
        gathered with DeepSpeed's own API: a collective, every rank calls it. In fp32 without ZeRO-3
        the module's weights are those master weights."""
        if self.cfg.deepspeed.precision == "fp32" and self.cfg.deepspeed.zero_stage < 3:
            return {k: v.detach().float() if v.is_floating_point() else v.detach()
                    for k, v in self.module.state_dict().items()}
        from deepspeed.utils import safe_get_full_fp32_param

        params = {name: safe_get_full_fp32_param(p) for name, p in self.module.named_parameters()}
        missing = [name for name, value in params.items() if value is None]
        if missing:
            raise RuntimeError(f"DeepSpeed holds no fp32 master copy of {missing[:3]}")
        state = {name: value.detach().float().cpu() for name, value in params.items()}
        for name, buffer in self.module.named_buffers():
            state[name] = buffer.detach().float().cpu() if buffer.is_floating_point() else buffer.detach().cpu()
        return state


def scale_groups(optimizer, base_lrs: list[float], factor: float) -> None:
    """Every parameter group at its own base rate x ``factor`` (what DeepSpeed's schedulers do too)."""
    groups = optimizer.param_groups
    if len(groups) != len(base_lrs):
        raise RuntimeError(f"the optimizer has {len(groups)} parameter groups, {len(base_lrs)} base rates")
    for group, base in zip(groups, base_lrs):
        group["lr"] = base * factor


def parameter_groups(module: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group at ``cfg.lr``; a fine-tuned encoder's parameters (``image_tail.``) in a second group at
    ``cfg.lr x cfg.finetune.lr_scale``."""
    tail = [p for name, p in module.named_parameters() if name.startswith("image_tail.")]
    rest = [p for name, p in module.named_parameters() if not name.startswith("image_tail.")]
    groups: list[dict[str, Any]] = [{"params": rest}]
    if tail:
        groups.append({"params": tail, "lr": cfg.lr * cfg.finetune.lr_scale})
    return groups


def make_engine(module: nn.Module, cfg: TrainConfig, device: torch.device | str = "cpu"):
    respect_omp_thread_limit()
    if cfg.strategy == "deepspeed":
        if not process_group_up():
            raise ValueError("the deepspeed strategy needs a process group (Ray Train, or RANK/WORLD_SIZE set)")
        return DeepSpeedEngine(module, cfg)
    return TorchEngine(module, cfg, torch.device(device))
