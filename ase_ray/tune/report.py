"""What a trial reports to Tune each epoch (imported inside trials only: it imports Ray)."""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

EPOCHS_KEY = "epochs_done"  # ASHA's time attribute: epochs trained, also after a resume from a checkpoint


class EpochReportCallback(TuneReportCallback):
    """Rank 0's epoch metrics to Tune, plus ``epochs_done`` (Tune's own iteration count restarts when
    a trial resumes from its Ray Train checkpoint; the epoch number does not)."""

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        if "epoch" in first:
            first[EPOCHS_KEY] = int(first["epoch"]) + 1
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
