"""Config section of ``ase-ray tune`` (light: pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ase_ray.config_base import StrictModel


class TuneConfig(StrictModel):
    """A Ray Tune search over training settings; the search space itself lives in a YAML file."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Search name (its folders and MLflow parent run); None: search-<timestamp>.",
    )
    num_samples: int | None = Field(
        None, ge=1, description="Samples of the space (grids repeat this often); None: the space's, else 1."
    )
    max_concurrent: int = Field(
        0, ge=0, description="Trials at once; 0: cluster CPUs // CPUs of one trial (workers + driver)."
    )
    driver_cpus: float = Field(0.1, gt=0, description="CPUs reserved for each trial's driver (Tune refuses 0).")
    metric: Literal["val_macro_f1", "val_accuracy"] = "val_macro_f1"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial (it resumes its own checkpoint).")
    register_best: bool = Field(True, description="Register the best trial's model (champion or challenger).")

