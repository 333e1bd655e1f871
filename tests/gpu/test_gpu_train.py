"""The training loop on CUDA: a real NCCL process group of one rank, DDP, bf16 autocast, batches and
collectives on the GPU. Plain torch: runs where Ray, DeepSpeed and MLflow are not installed (in the
CPU dry run, ASE_RAY_GPU_TESTS_DEVICE=cpu, the group is gloo)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group(gpu_device):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    if gpu_device.type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        device = gpu_device
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield device
    dist.destroy_process_group()


def test_loop_on_cuda_in_bf16_under_nccl(process_group, tmp_path):
    from ase_ray.config import load_config
    from ase_ray.testing import fake_feature_store
    from ase_ray.train.data import LABEL_KEY, load_task_arrays
    from ase_ray.train.loop import predict_proba, run_epochs, smallest_across_ranks

    fake_feature_store(tmp_path / "store", per_class=12)
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    arrays = {k: {**a.features, LABEL_KEY: a.labels} for k, a in splits.items()}
    cfg = load_config(overrides=["train.epochs=4", "train.lr=3e-3", "train.autocast=bf16",
                                 "train.pfa.epochs_per_stage=1", "train.pfa.first_fraction=0.5"]).train
    device = process_group
    assert smallest_across_ranks(17, device) == 17  # the NCCL all-reduce of a CUDA tensor
    result = run_epochs(arrays["train"], arrays["val"], cfg, classes, device=device,
                        common_size=lambda n: smallest_across_ranks(n, device))
    assert next(result.module.parameters()).device.type == device.type
    assert all(p.dtype == torch.float32 for p in result.module.parameters())  # autocast, fp32 weights
    losses = [h["train_ce"] for h in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "val_macro_f1" in result.history[-1] and result.best is not None
    probs = predict_proba(result.module, arrays["test"], device)
    assert probs.shape == (len(arrays["test"][LABEL_KEY]), len(classes))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
