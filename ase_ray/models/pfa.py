"""Progressive feature alignment (PFA): alignment heads, the class-aware InfoNCE loss and the
per-sample image-text similarity that orders the curriculum (``ase_ray.models.schedule``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ase_ray.models.projections import Batch

if TYPE_CHECKING:
    from ase_ray.models.classifier import DefectClassifier


class AlignmentHeads(nn.Module):
    """Projected image pooled vector and mean projected text pooled vector -> proj_dim, L2-normalised."""

    def __init__(self, d_model: int, proj_dim: int):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, proj_dim))
        self.text = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, proj_dim))

    def forward(self, image_pooled: torch.Tensor, text_pooled_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image_pooled), dim=-1), F.normalize(self.text(text_pooled_mean), dim=-1)


def class_aware_info_nce(
    img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE where every same-class (image, text) pair is a positive.

    ``logits = img @ txt.T / temperature``. For image i the loss is minus the mean, over the texts j
    of i's class (i itself included), of ``log softmax_j(logits[i])``; text->image is the same on
    ``logits.T``. The result is the average of the two directions' batch means. Inputs are expected
    L2-normalised (B, P); labels (B,).
    """
    img = img.float()
    txt = txt.float()
    logits = img @ txt.T / temperature
    positives = (labels[:, None] == labels[None, :]).float()
    n_pos = positives.sum(dim=1)  # >= 1: the diagonal is always a positive
    image_to_text = -(F.log_softmax(logits, dim=1) * positives).sum(dim=1) / n_pos
    text_to_image = -(F.log_softmax(logits.T, dim=1) * positives).sum(dim=1) / n_pos
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


@torch.no_grad()
def self_similarity(model: "DefectClassifier", batch: Batch) -> torch.Tensor:
    """(B,) cosine between each sample's own image and text alignment embeddings, in eval mode
    (no dropout); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        img, txt = model.align_embeddings(batch)
    finally:
        model.train(was_training)
    return (img * txt).sum(dim=-1)
