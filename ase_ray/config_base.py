"""The base of every config section (kept apart so stage modules can define sections without cycles)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Every config section forbids unknown keys and re-validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
