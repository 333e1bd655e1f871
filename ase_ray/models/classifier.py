"""The defect classifier (every kind in one module), its builder and its training loss.

``forward(batch)`` takes a dict of tensors keyed like the feature-store columns and returns
``{"logits": (B, C)}`` plus ``"gates"`` (B, 2) for gated/cmaf and ``"img_align"``/``"txt_align"``
(B, proj_dim) when the model was built with PFA alignment heads. Binary vs multi-class is only
``num_classes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ase_ray.models.defect_maps import DEFECT_CELLS, DefectMapHead, cell_loss
from ase_ray.models.fusion import ClassificationHead, CmafFusion, GatedFusion
from ase_ray.models.pfa import AlignmentHeads, class_aware_info_nce
from ase_ray.models.projections import (
    Batch,
    FeatureDims,
    ImageProjection,
    TextProjection,
    TokenAttentionPool,
)
from ase_ray.models.settings import ModelSettings, PfaSettings
from ase_ray.torch_threads import respect_omp_thread_limit

POOLED_IMAGE_KINDS = ("image_only", "concat", "gated")
POOLED_TEXT_KINDS = ("text_only", "concat", "gated")
FUSED_KINDS = ("concat", "gated", "cmaf")
IMAGE_LOGITS = "image_logits"  # training output of a model built with image_logits: its image head's logits


class DefectClassifier(nn.Module):
    """Only the parts a kind uses are built, so every parameter receives a gradient.

    ``align_dim`` (PFA's proj_dim, or None) adds the alignment heads; they read the projected pooled
    image vector and the mean of the projected pooled text sources, so alignment shapes the same
    projections the classifier uses (for image_only/text_only it also builds the other side's pooled
    projection, used only by the alignment loss).
    """

    def __init__(self, settings: ModelSettings, dims: FeatureDims, num_classes: int, align_dim: int | None = None):
        super().__init__()
        respect_omp_thread_limit()  # every process that runs this model: the train workers, Serve, predict, tests
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.settings = settings.model_copy(deep=True)
        self.dims = dims
        self.num_classes = num_classes
        self.align_dim = align_dim
        kind, d, dropout = settings.kind, settings.d_model, settings.dropout
        image_logits = settings.image_logits and kind in FUSED_KINDS
        self.needs_image_pooled = kind in POOLED_IMAGE_KINDS or align_dim is not None or image_logits
        self.needs_text_pooled = kind in POOLED_TEXT_KINDS or align_dim is not None
        wants_image = kind != "text_only" or align_dim is not None
        self.defect_maps = None
        if settings.image_pooling == "defect_maps" and wants_image:
            if not dims.stem_dim:
                raise ValueError("model.image_pooling defect_maps reads image_stem: the batch has none "
                                 "(extract with features.image_encoder.stem: true)")
            self.defect_maps = DefectMapHead(dims.stem_dim, dims.stem_size, settings.defect_map_width, num_classes,
                                             d, dropout, with_tokens=kind == "cmaf",
                                             context=settings.defect_map_context)

        self.image = (
            ImageProjection(dims.image_dim, dims.image_tokens, d, dropout, with_tokens=kind == "cmaf",
                            with_pooled=self.needs_image_pooled, pooled_dim=dims.pooled_image_dim,
                            patch_queries=settings.image_pool_queries
                            if self.needs_image_pooled and settings.image_pooling == "attention" else 0)
            if wants_image and self.defect_maps is None
            else None
        )
        use_llm = settings.use_llm_hidden and kind != "image_only"
        numeric_dim = dims.numeric_dim if settings.numeric_sources and kind != "image_only" else 0
        token_pool = (
            TokenAttentionPool(d, settings.heads, dropout, len(settings.text_sources), dims.text_len,
                               settings.text_pool_queries, settings.text_pool_layers)
            if kind in POOLED_TEXT_KINDS and settings.text_pooling == "attention"
            else None
        )
        self.text = (
            TextProjection(dims.text_dim, dims.llm_dim, d, dropout, settings.text_sources, use_llm, numeric_dim,
                           token_pool)
            if kind != "image_only" or align_dim is not None
            else None
        )
        text_set = self.text.pooled_entries + self.text.extra_entries if self.text is not None else 0
        self.fusion: CmafFusion | GatedFusion | None = None
        if kind == "cmaf":
            self.fusion = CmafFusion(d, settings.heads, dropout)
        elif kind == "gated":
            self.fusion = GatedFusion(d)
        self.cmaf_pooled_image = (kind == "cmaf" and self.defect_maps is not None and settings.cmaf_pooled_image
                                  and not image_logits)
        fused_dim = {
            "image_only": d,
            "text_only": text_set * d,
            "concat": (1 + text_set) * d,
            "gated": d,
            "cmaf": (3 if self.cmaf_pooled_image else 2) * d,
        }[kind]
        self.head = ClassificationHead(fused_dim, settings.head_hidden, num_classes, dropout)
        self.image_head = None
        if image_logits:
            self.image_head = ClassificationHead(d, settings.head_hidden, num_classes, dropout)
            self.head.zero_output()  # the fused head starts as no correction to the image's decision
        self.image_tail = None
        if settings.image_tail is not None and self.image is not None:
            from ase_ray.models.encoder_tail import ImageTail

            self.image_tail = ImageTail(settings.image_tail)
        self.align = AlignmentHeads(d, align_dim) if align_dim is not None else None
        # Fitted after training on the validation split (ase_ray.models.calibration); 1 while training.
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = self.settings.eval_views
        out = self._forward_view(batch)
        if self.training or views <= 1 or "image_stem" not in batch:
            return out
        # Test-time augmentation: the mean logit over dihedral views of the map (view 0 is the map as
        # stored, whose cells, gates and alignment embeddings are returned).
        from ase_ray.features.image_encoder import dihedral

        logits = [out["logits"]]
        for view in range(1, views):
            turned = dict(batch, image_stem=dihedral(batch["image_stem"], view))
            logits.append(self._forward_view(turned)["logits"])
        out["logits"] = torch.stack(logits).mean(dim=0)
        return out

    def _forward_view(self, batch: Batch) -> dict[str, torch.Tensor]:
        kind = self.settings.kind
        if self.image_tail is not None:
            batch = self.image_tail.with_adapted_image(batch)
        cells = image_tokens = None
        if self.defect_maps is not None:
            image_vec, image_tokens, cells = self.defect_maps(batch["image_stem"])
        else:
            image_vec = self.image.pooled(batch) if self.needs_image_pooled else None
        text_sources = self.text.source_pooled(batch) if self.needs_text_pooled else None
        gates = None
        if kind == "image_only":
            fused = image_vec
        elif kind == "text_only":
            fused = self.text.pooled_set(batch, text_sources).flatten(1)
        elif kind == "concat":
            fused = torch.cat([image_vec, self.text.pooled_set(batch, text_sources).flatten(1)], dim=-1)
        elif kind == "gated":
            fused, gates = self.fusion(image_vec, self.text.pooled_set(batch, text_sources))
        else:
            text_tokens, text_mask, segments = self.text.tokens(batch)
            if image_tokens is None:
                image_tokens = self.image.tokens(batch)
            fused, gates = self.fusion(image_tokens, text_tokens, text_mask, segments)
            if self.cmaf_pooled_image:
                fused = torch.cat([fused, image_vec], dim=-1)
        logits = self.head(fused)
        image_logits = None
        if self.image_head is not None:
            image_logits = self.image_head(image_vec)
            logits = logits + image_logits
        if cells is not None and self.settings.defect_map_decision > 0:
            scores = self.defect_maps.decision_scores(cells)
            if scores is not None:
                logits = logits + self.settings.defect_map_decision * scores.to(logits.dtype)
        out = {"logits": logits / self.temperature}
        if image_logits is not None and self.training:
            out[IMAGE_LOGITS] = image_logits
        if cells is not None:
            out[DEFECT_CELLS] = cells
        if gates is not None:
            out["gates"] = gates
        if self.align is not None:
            out["img_align"], out["txt_align"] = self.align(image_vec, text_sources.mean(dim=1))
        return out

    def align_embeddings(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_align, txt_align), each (B, proj_dim), without running the fusion and head."""
        if self.align is None:
            raise ValueError("this model has no alignment heads (build it with PFA enabled)")
        if self.image_tail is not None:
            batch = self.image_tail.with_adapted_image(batch)
        image_vec = self.defect_maps(batch["image_stem"])[0] if self.defect_maps is not None else self.image.pooled(batch)
        return self.align(image_vec, self.text.source_pooled(batch).mean(dim=1))


def build_model(
    settings: ModelSettings, dims: FeatureDims, num_classes: int, pfa: PfaSettings | None = None
) -> DefectClassifier:
    """The classifier; with ``pfa`` enabled it carries alignment heads of width ``pfa.proj_dim``."""
    align_dim = pfa.proj_dim if pfa is not None and pfa.enabled else None
    return DefectClassifier(settings, dims, num_classes, align_dim)


def compute_loss(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, pfa: PfaSettings | None,
    class_weights: torch.Tensor | None = None, mix: tuple[torch.Tensor, float] | None = None,
    cell_targets: torch.Tensor | None = None, cell_weights: torch.Tensor | None = None, cell_weight: float = 1.0,
    label_smoothing: float = 0.0, image_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy (weighted per class when ``class_weights`` (C,) is given), plus ``align_weight`` x
    class-aware InfoNCE when PFA is enabled and the outputs carry alignment embeddings. Returns the total
    (for backward) and floats for logging (``ce``, ``align`` when used, ``loss``). ``mix`` = (partner
    order, lambda) of a mixup batch (``ase_ray.models.augment``): the cross-entropy is lambda x that of
    the labels plus (1 - lambda) x that of the partners' labels; ``label_smoothing`` smooths both. A
    defect-map model given ``cell_targets`` (B, Hs, Hs) adds ``cell_weight`` x the cross-entropy of its
    known cells (``cells`` in the parts). A model built with image_logits adds ``image_weight`` x the
    cross-entropy of its image head alone (``image_ce``)."""
    labels = labels.long()

    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels, weight=class_weights, label_smoothing=label_smoothing)
        if mix is None:
            return ce
        partners, lam = mix
        return lam * ce + (1.0 - lam) * F.cross_entropy(logits, labels[partners], weight=class_weights,
                                                        label_smoothing=label_smoothing)

    ce = cross_entropy(outputs["logits"].float())
    total = ce
    parts = {"ce": float(ce.detach())}
    if image_weight > 0 and IMAGE_LOGITS in outputs:
        image_ce = cross_entropy(outputs[IMAGE_LOGITS].float())
        total = total + image_weight * image_ce
        parts["image_ce"] = float(image_ce.detach())
    if pfa is not None and pfa.enabled and "img_align" in outputs:
        align = class_aware_info_nce(outputs["img_align"], outputs["txt_align"], labels, pfa.temperature)
        total = total + pfa.align_weight * align
        parts["align"] = float(align.detach())
    if cell_targets is not None and DEFECT_CELLS in outputs and cell_weight > 0:
        cells = cell_loss(outputs[DEFECT_CELLS], cell_targets, cell_weights, mix)
        if cells is not None:
            total = total + cell_weight * cells
            parts["cells"] = float(cells.detach())
    parts["loss"] = float(total.detach())
    return total, parts
