"""torch's CPU thread count, kept within what OpenMP will actually run."""

from __future__ import annotations

import os


def respect_omp_thread_limit() -> int:
    """Cap torch's intra-op threads at ``OMP_THREAD_LIMIT``. With more torch threads than OpenMP lets
    run, oneDNN's CPU kernels wait for threads that never start (torch 2.13, OMP_THREAD_LIMIT=1, which the
    project sets for tesseract): bf16 matrix products come back partly uncomputed (garbage, NaN) while
    fp32 ones are right, and on AVX-512 CPUs (AMD EPYC, 2026-12-07) the weight gradient of a 1x1
    convolution never returns (the defect maps' first layer). Returns the thread count in force."""
    import torch

    limit = os.environ.get("OMP_THREAD_LIMIT", "")
    if limit.isdigit() and 0 < int(limit) < torch.get_num_threads():
        torch.set_num_threads(int(limit))
    return torch.get_num_threads()
