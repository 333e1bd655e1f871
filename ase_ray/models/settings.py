"""Config sections of the classifier and of progressive feature alignment (light: pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ase_ray.config_base import StrictModel

# Kept here (not imported from ase_ray.features) so that reading the config never imports numpy/torch.
TEXT_SOURCES: tuple[str, ...] = ("ocr", "description", "reasoning", "metadata")
NUMERIC_SOURCES: tuple[str, ...] = ("ocr", "metadata")

ModelKind = Literal["image_only", "text_only", "concat", "gated", "cmaf"]
TextPooling = Literal["mean", "attention"]
ImagePooling = Literal["stored", "attention", "defect_maps"]
TextSource = Literal["ocr", "description", "reasoning", "metadata"]
NumericSource = Literal["ocr", "metadata"]


class ImageTailSpec(StrictModel):
    """Which backbone's later stages a fine-tuning model carries (``ase_ray.models.encoder_tail``).
    Training copies it from the feature store's ``features.image_encoder``; it is not set by hand."""

    backend: str
    model_id: str = "microsoft/resnet-50"
    revision: str = "main"
    image_size: int = Field(224, ge=32)
    pooling: Literal["mean", "mean_max"] = "mean"


class ModelSettings(StrictModel):
    """Which classifier to build and how wide.

    ``cmaf`` is the paper's cross-modality attention fusion over token sequences; the others are
    baselines over pooled vectors: ``image_only``, ``text_only`` (pooled texts concatenated),
    ``concat`` (pooled image and texts concatenated) and ``gated`` (sigmoid-gated sum). The pooled kinds
    read each text source through ``text_pooling``.
    """

    kind: ModelKind = "cmaf"
    d_model: int = Field(128, ge=4, le=4096, description="Width every feature is projected to.")
    heads: int = Field(4, ge=1, le=64, description="Attention heads (cmaf); must divide d_model.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    text_sources: list[TextSource] = Field(
        default_factory=lambda: list(TEXT_SOURCES), description="Text sources the model reads."
    )
    use_llm_hidden: bool = Field(True, description="Add the LLM hidden state as one extra text token.")
    numeric_sources: list[NumericSource] = Field(
        default_factory=lambda: list(NUMERIC_SOURCES),
        description="What the numeric block holds (ase_ray.models.numeric): parsed OCR fields and/or numeric "
        "metadata columns; [] builds no numeric block. The block is one extra text token (cmaf) or one extra "
        "entry of the pooled text set.")
    text_pooling: TextPooling = Field(
        "attention",
        description="How the pooled kinds (text_only, concat, gated) read a text source. mean: the store's "
        "mean-pooled vector, one per source; attention: one transformer layer over the source's token states, "
        "then text_pool_queries learned queries attend over them (that many vectors per source), so a number "
        "or a position in the text keeps its value. cmaf reads the tokens itself and ignores this.")
    text_pool_queries: int = Field(4, ge=1, le=32, description="Learned queries per text source (attention pooling).")
    text_pool_layers: int = Field(1, ge=0, le=4, description="Transformer layers over the token states before the "
                                  "attention pooling (0: pool the projected states directly).")
    image_pooling: ImagePooling = Field(
        "stored", description="How the pooled kinds (image_only, concat, gated) and PFA's alignment see the image. "
        "stored: the store's image_pooled vector; attention: image_pool_queries learned queries attend over the "
        "image tokens (multiple-instance pooling: a defect lives in a few patches, which a mean dilutes); "
        "defect_maps: a trainable convolutional head over the stride-16 map (image_stem; extract with "
        "features.image_encoder.stem: true) scores every cell per class, supervised by the pixel masks where the "
        "manifest has them (mask_path); its cells are also CMAF's image tokens (ase_ray.models.defect_maps).")
    defect_map_width: int = Field(96, ge=4, le=2048, description="Channels of the defect-map head (defect_maps).")
    defect_map_context: int = Field(
        0, ge=0, le=4, description="defect_maps: residual 3x3 convolutions after the head's body, on the map "
        "pooled 2x2 and dilated 1, 2, ...: each cell's score also reads its surroundings (the body alone sees 3x3 "
        "cells, 48 px at stride 16; two blocks reach 7 cells either way); 0: none.")
    defect_map_decision: float = Field(
        0.0, ge=0, le=10, description="defect_maps: weight of the image scores read off the map (a defect class "
        "scores its most confident cell, the normal class its least normal cell: multiple-instance) added to the "
        "head's logits; 0: the head alone decides.")
    eval_views: Literal[1, 2, 4, 8] = Field(
        1, description="Test-time augmentation of a model that reads image_stem (defect_maps, or a fine-tuned "
        "image_tail): in eval mode the logits are averaged over this many dihedral views of the stride-16 map "
        "(flips and quarter turns, the turns training sees); 1: the map as stored. Validation, calibration, "
        "Serve and predict all score the averaged logits.")
    cmaf_pooled_image: bool = Field(
        False, description="cmaf with defect_maps: the head reads the map's pooled vector (mean and max of the cells "
        "and of their class probabilities, the image-only variant's input) beside CMAF's fused vector. CMAF's own "
        "image side is a mean over the cell tokens, in which a defect a few cells wide fades.")
    image_logits: bool = Field(
        False, description="The fused kinds (concat, gated, cmaf) add the logits of an image-only head (over the "
        "pooled image vector, the image-only variant's input) to the fused head's, whose last layer starts at zero: "
        "training starts from the image's decision and the text branch learns a correction to it. With cmaf the "
        "pooled vector then feeds the image head and not the fused one (cmaf_pooled_image is implied). image_only and "
        "text_only ignore it, so one config serves every variant of an ablation.")
    image_pool_queries: int = Field(4, ge=1, le=32, description="Learned queries over the image tokens (attention).")
    head_hidden: int = Field(128, ge=1, le=16384, description="Hidden width of the classification MLP.")
    image_tail: ImageTailSpec | None = Field(
        None, description="Set by training when train.finetune is on (from the store's image encoder settings): "
        "the model carries the encoder's later stages and reads image_stem.")

    @model_validator(mode="after")
    def _one_image_adapter(self) -> "ModelSettings":
        if self.image_pooling == "defect_maps" and self.image_tail is not None:
            raise ValueError("model.image_pooling defect_maps and train.finetune both read image_stem: choose one")
        if self.eval_views > 1 and self.image_pooling != "defect_maps" and self.image_tail is None:
            raise ValueError("model.eval_views turns the stride-16 map: set model.image_pooling defect_maps or "
                             "train.finetune")
        if self.defect_map_decision > 0 and self.image_pooling != "defect_maps":
            raise ValueError("model.defect_map_decision reads the defect maps: set model.image_pooling defect_maps")
        return self

    @field_validator("text_sources")
    @classmethod
    def _unique_sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"text_sources must name at least one of {list(TEXT_SOURCES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"text_sources has duplicates: {v}")
        return v

    @field_validator("numeric_sources")
    @classmethod
    def _unique_numeric(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"numeric_sources has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelSettings":
        if self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model})")
        return self


class PfaSettings(StrictModel):
    """Progressive feature alignment: class-aware image-text contrastive loss plus a curriculum that
    trains on a growing subset ordered by image-text similarity (see ``ase_ray.models.schedule``)."""

    enabled: bool = True
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="InfoNCE temperature.")
    align_weight: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the alignment loss vs cross-entropy.")
    first_fraction: float = Field(0.2, gt=0.0, le=1.0, description="First subset size, fraction of the train set.")
    stride: float = Field(0.2, gt=0.0, le=1.0, description="Fraction of the train set added at each stage.")
    epochs_per_stage: int = Field(5, ge=1, le=10_000)
    ordering: Literal["easy_first", "hard_first"] = Field(
        "easy_first", description="easy_first: highest image-text similarity first; hard_first: lowest first."
    )
    per_class: bool = Field(
        False, description="Rank by similarity within each class, so every stage holds the same share of every "
        "class (the paper ranks over the whole set)."
    )
    proj_dim: int = Field(64, ge=2, le=4096, description="Width of the L2-normalised alignment embeddings.")
