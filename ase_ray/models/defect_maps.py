"""Defect maps (``model.image_pooling: defect_maps``): the encoder's stride-16 map (``image_stem``)
through a small trainable convolutional head that scores every cell for every class.

Why: a defect lives in a few cells of the map; pooled frozen features average it away, and a head
trained on image labels alone must guess where to look from a few hundred images. Where the manifest
has pixel masks (``mask_path``), each cell's class is known (``ase_ray.data.masks``), so every defect
image also teaches *where* its defect is: many supervised cells per image instead of one label. Rows
without a mask (TDA copies, images of a set without masks) train the image loss only.

The image vector is the mean and max of the cell features and of the cell class probabilities (a small
peak survives the max), projected to ``d_model``; CMAF reads the cells' features, averaged over 2x2
cells (as many tokens as the final map has), as its image tokens. The cell scores are the model's
defect map (output ``defect_cells``).

With ``model.defect_map_decision`` > 0 the map also votes directly (multiple-instance): a defect class
scores the log-probability of its most confident cell, the normal class that of the least normal cell,
and these scores, weighted, are added to the head's logits. The image loss then reaches the cells through
that vote too. Which class is normal is set by training (``set_normal_class``: the commonest cell class)
and saved with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFECT_CELLS = "defect_cells"  # model output: (B, C, Hs, Hs) class logits per cell
DEFECT_TARGET = "defect_target"  # training target: (B, Hs, Hs) class index per cell, -1 where unknown


class DefectMapHead(nn.Module):
    """``image_stem`` (B, Cs, Hs, Hs) -> (image vector (B, d), tokens (B, ceil(Hs/2)^2, d) or None, cell logits
    (B, num_classes, Hs, Hs))."""

    def __init__(self, stem_dim: int, stem_size: int, width: int, num_classes: int, d_model: int, dropout: float,
                 with_tokens: bool, context: int = 0):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(stem_dim, affine=False),  # the stem's channels differ in scale by orders of magnitude
            nn.Conv2d(stem_dim, width, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout2d(dropout),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.context = nn.ModuleList(ContextBlock(width, 2 ** i) for i in range(context))
        self.cells = nn.Conv2d(width, num_classes, 1)
        self.pool_proj = nn.Linear(2 * width + 2 * num_classes, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.token_proj = nn.Linear(width, d_model) if with_tokens else None
        self.token_side = -(-stem_size // 2)
        self.position = nn.Parameter(torch.randn(self.token_side ** 2, d_model) * 0.02) if with_tokens else None
        self.register_buffer("normal_class", torch.tensor(-1, dtype=torch.long))  # -1: unknown, no vote

    def set_normal_class(self, index: int) -> None:
        self.normal_class.fill_(int(index))

    def decision_scores(self, cells: torch.Tensor) -> torch.Tensor | None:
        """(B, C) image scores read off the cell logits (B, C, Hs, Hs): log-probability of the most confident
        cell per defect class, of the least normal cell for the normal class; None while the normal class
        is unknown."""
        normal = int(self.normal_class)
        if normal < 0:
            return None
        logp = F.log_softmax(cells.float(), dim=1).flatten(2)
        is_normal = torch.arange(cells.shape[1], device=cells.device) == normal
        return torch.where(is_normal, logp.amin(dim=2), logp.amax(dim=2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "normal_class", torch.tensor(-1, dtype=torch.long))  # saved before the vote
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, stem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        h = self.body(stem.to(self.pool_proj.weight.dtype))
        for block in self.context:
            h = block(h)
        cells = self.cells(h)
        probs = F.softmax(cells.float(), dim=1).to(h.dtype)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), probs.mean(dim=(2, 3)), probs.amax(dim=(2, 3))], 1)
        vector = self.drop(self.norm(self.pool_proj(pooled)))
        tokens = None
        if self.token_proj is not None:
            cells_2x2 = F.adaptive_avg_pool2d(h, self.token_side).flatten(2).transpose(1, 2)
            tokens = self.drop(self.norm(self.token_proj(cells_2x2) + self.position))
        return vector, tokens, cells


class ContextBlock(nn.Module):
    """A residual 3x3 convolution, dilated by ``dilation``, on the map pooled 2x2: each cell also reads the
    cells up to 2 x ``dilation`` + 1 away (a break at the tile's edge, a fray along it, an uneven patch wider
    than the 3x3 cells the body sees). At half resolution it costs about a third of a full-resolution one."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation),
                                  nn.BatchNorm2d(width), nn.ReLU())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        context = self.conv(F.avg_pool2d(h, 2, ceil_mode=True))
        return h + F.interpolate(context, size=h.shape[-2:], mode="nearest")


def cell_loss(cells: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
              mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor | None:
    """Cross-entropy over the cells with a known class (None when the batch has none). Under mixup the
    two images' cell targets are mixed as their labels are."""
    targets = targets.long()
    if not bool((targets >= 0).any()):
        return None
    logits = cells.float()

    def ce(t: torch.Tensor) -> torch.Tensor:
        known = (t >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, t, weight=weights, ignore_index=-1, reduction="sum") / known

    if mix is None:
        return ce(targets)
    partners, lam = mix
    return lam * ce(targets) + (1.0 - lam) * ce(targets[partners])
