"""Training-time augmentation of a batch of stored features (``train.finetune``).

- **dihedral**: the whole batch's ``image_stem`` maps turned by one of the 8 flips and quarter turns. It
  acts on the stride-16 map, not the pixels (the early stages are cached), so it teaches the trainable
  later stages that a part may lie either way round; the stem is square (``resize`` squash or pad).
- **mixup** (Zhang et al. 2018): each image input is mixed with a partner's, ``lam x mine + (1 - lam) x
  partner's``, lam ~ Beta(alpha, alpha); the loss mixes the two labels the same way
  (``compute_loss(mix=...)``). Only the image inputs are mixed: texts carry token masks that do not mix.
  A defect map's cell targets (``defect_target``) turn with the stem and are mixed in the loss, as labels.

Exposure changes act on pixels, which the cached stem no longer has: not done here.
"""

from __future__ import annotations

import numpy as np
import torch

from ase_ray.models.defect_maps import DEFECT_TARGET

IMAGE_INPUTS = ("image_stem", "image_pooled", "image_tokens")


def augment_batch(batch: dict[str, torch.Tensor], dihedral_views: bool, mixup_alpha: float,
                  rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, float] | None]:
    """(the augmented batch, the mixup (partner order, lambda) or None). Labels are never changed here."""
    from ase_ray.features.image_encoder import dihedral

    out = dict(batch)
    if dihedral_views and "image_stem" in out:
        view = int(rng.integers(8))
        out["image_stem"] = dihedral(out["image_stem"], view)
        if DEFECT_TARGET in out:  # the cells' classes turn with the map
            out[DEFECT_TARGET] = dihedral(out[DEFECT_TARGET].unsqueeze(1), view).squeeze(1)
    n = len(next(iter(out.values())))
    if mixup_alpha <= 0 or n < 2:
        return out, None
    lam = float(rng.beta(mixup_alpha, mixup_alpha))
    partners = torch.from_numpy(rng.permutation(n)).to(next(iter(out.values())).device)
    for key in IMAGE_INPUTS:
        if key in out:
            out[key] = lam * out[key] + (1.0 - lam) * out[key][partners]
    return out, (partners, lam)
