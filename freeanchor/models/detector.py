"""The FreeAnchor detector: backbone -> FPN -> RetinaNet head, trained with the FreeAnchor loss
(or RetinaNet's own, `model.loss=retinanet`, the baseline of `freeanchor compare`).

`forward` returns raw per-level head outputs (export-clean); `loss` adds anchors and the
training loss (`loss_fn`); `detect` adds the test-time post-processing; `predict` runs the whole
test-time pipeline (`freeanchor.inference`) on files, folders, globs, PIL images, arrays or
tensors and returns `Results`.

    model = build_model("freeanchor_r50_fpn_1x_coco", pretrained_backbone="torchvision")
    model = freeanchor.load_model("freeanchor_r50_fpn_1x_coco")  # MMDetection's released weights
    results = model.predict(["a.jpg", "photos/"], score_thr=0.3)
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from freeanchor.config import ModelConfig, preset
from freeanchor.data.io import DEFAULT_MAX_PIXELS
from freeanchor.data.transforms import ImageMeta
from freeanchor.errors import ImageReadError, OptionError
from freeanchor.inference import ImageInput, Pipeline, Skipped, expand_sources
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.backbone import build_backbone, load_pretrained_backbone
from freeanchor.models.box_coder import DeltaXYWHCoder
from freeanchor.models.fpn import FPN
from freeanchor.models.head import RetinaHead
from freeanchor.models.loss import FreeAnchorLoss
from freeanchor.models.postprocess import decode_outputs
from freeanchor.models.retinanet_loss import RetinaNetLoss
from freeanchor.results import SCORE_THR, Results


class CheckpointData(Protocol):
    """What `FreeAnchor.from_checkpoint` needs (`freeanchor.models.weights.Checkpoint`)."""

    cfg: ModelConfig
    state: dict[str, Tensor]
    extra: dict[str, Any]

    def check_keys(self, expected: dict[str, Tensor]) -> None: ...


class FreeAnchor(nn.Module):
    """RetinaNet-architecture detector (MMDetection layout), trained with a pluggable loss.

    Every part is a constructor argument with the standard default built from `cfg`
    (torchvision style), so a part can be swapped without a registry:

        model = FreeAnchor(cfg)                                  # backbone, FPN, head, loss
        model = FreeAnchor(cfg, head=MyHead(...))                # a user-defined head
        model = FreeAnchor(cfg, loss=RetinaNetLoss(cfg.num_classes, box_coder=coder))

    Args:
        cfg: the architecture and the default parts' settings.
        backbone: gives C3..C5 (a list of 3 maps) and has `out_channels` (their channels).
        fpn: C3..C5 -> one map per anchor level (`len(cfg.strides)`).
        head: levels -> (cls_scores, bbox_preds) per level, [N, A*C, H_l, W_l] and
            [N, A*4, H_l, W_l] with channel a*C + c (A = anchors per location, 9 by default).
        loss: (cls_scores, bbox_preds, anchors [A_all, 4], gt_boxes, gt_labels, num_gts)
            -> dict of scalar terms; default `build_loss(cfg, ...)` (`cfg.loss` picks it).
        box_coder: decodes the deltas at test time; it must be the coder the loss encodes
            with (default: the given loss's `box_coder`, else `cfg.target_stds`). A checkpoint
            records `cfg` only: make `cfg` describe a given loss (e.g. `retinanet_config`).
        normalize, imgs_per_gpu: the default loss's normaliser (see `FreeAnchorLoss`);
            ignored when `loss` is given.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        backbone: nn.Module | None = None,
        fpn: nn.Module | None = None,
        head: nn.Module | None = None,
        loss: nn.Module | None = None,
        box_coder: DeltaXYWHCoder | None = None,
        normalize: str = "local",
        imgs_per_gpu: int = 2,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # The default parts are built in this order (backbone, FPN, head), which fixes the
        # random initial weights for a seed: a default model is bitwise the same as before.
        if backbone is None:
            backbone = build_backbone(cfg)
        if fpn is None:
            fpn = FPN(backbone.out_channels, cfg.fpn_channels, num_outs=len(cfg.strides))
        self.backbone, self.fpn = backbone, fpn
        self.anchor_generator = AnchorGenerator(
            cfg.strides, cfg.ratios, cfg.octave_base_scale, cfg.scales_per_octave
        )
        if head is None:
            head = RetinaHead(cfg.num_classes, in_channels=cfg.fpn_channels,
                              feat_channels=cfg.feat_channels, stacked_convs=cfg.stacked_convs,
                              num_anchors=self.anchor_generator.num_base_anchors,
                              prior_prob=cfg.prior_prob)  # fmt: skip
        self.head = head
        if box_coder is None:  # decode as the loss encodes
            box_coder = getattr(loss, "box_coder", None) or DeltaXYWHCoder(cfg.target_stds)
        self.box_coder = box_coder
        if loss is None:
            loss = build_loss(cfg, self.box_coder, normalize, imgs_per_gpu)
        self.loss_fn = loss
        # Plain metadata a checkpoint carried (e.g. the dataset's "cat_ids"); see weights.py.
        self.extra: dict = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: CheckpointData) -> FreeAnchor:
        """Build the model a checkpoint describes and load its weights (strictly).

        Args:
            checkpoint: `freeanchor.models.weights.read_checkpoint(path)`.

        Raises:
            CheckpointError: a missing, unexpected or mis-shaped key (named).
        """
        model = cls(checkpoint.cfg)
        checkpoint.check_keys(model.state_dict())
        model.load_state_dict(checkpoint.state, strict=True)
        model.extra = dict(checkpoint.extra)
        return model

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images [N, 3, H, W] (normalised, padded) -> (cls_scores, bbox_preds).

        cls_scores: per level P3..P7 [N, 9*C, H_l, W_l] logits; bbox_preds: [N, 36, H_l, W_l].
        """
        return self.head(self.fpn(self.backbone(images)))

    def anchors(
        self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str
    ) -> list[Tensor]:
        """Per-level anchors [H_l*W_l*9, 4] for these feature-map sizes (cached by the
        anchor generator)."""
        return self.anchor_generator.grid_anchors(featmap_sizes, device)

    def loss(
        self,
        images: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        num_gts: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Training loss (`loss_fn`: FreeAnchor's or RetinaNet's) of a batch.

        Args:
            images: [N, 3, H, W] normalised, padded.
            gt_boxes: per image [K_i, 4] xyxy in input pixels.
            gt_labels: per image [K_i] int64, 0-based.
            num_gts: with `loss_fn.normalize == "global"`, the gt count to normalise by (e.g.
                summed over all processes); default this batch's.

        Returns:
            the loss terms, e.g. {"positive_bag_loss": scalar, "negative_bag_loss": scalar}
            (FreeAnchor) or {"loss_cls": scalar, "loss_bbox": scalar} (RetinaNet).
        """
        cls_scores, bbox_preds = self(images)
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        anchors = torch.cat(self.anchors(sizes, images.device), dim=0)
        # The per-level maps go to the loss as they are: flattening them first would copy the
        # logits twice (forward and backward) for nothing.
        return self.loss_fn(cls_scores, bbox_preds, anchors, list(gt_boxes), list(gt_labels),
                            num_gts)  # fmt: skip

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        metas: Sequence[ImageMeta],
        rescale: bool = True,
        score_thr: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections of a preprocessed batch (call `.eval()` first).

        Args:
            images: [N, 3, H, W] normalised, padded.
            metas: per image, from `preprocess`.
            rescale: boxes in original-image pixels (else in network-input pixels).
            score_thr: minimum score (default `cfg.score_thr`).

        Returns:
            per image {"boxes" [n, 4] xyxy float32, "scores" [n], "labels" [n] int64}.
        """
        cls_scores, bbox_preds = self(images)
        return decode_outputs(
            cls_scores, bbox_preds, metas, self.anchor_generator, self.box_coder, self.cfg,
            score_thr=score_thr, rescale=rescale,
        )  # fmt: skip

    def predict(
        self,
        sources: ImageInput | Sequence[ImageInput],
        score_thr: float | None = SCORE_THR,
        batch_size: int = 4,
        bgr: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        skip_unreadable: bool = False,
    ) -> list[Results]:
        """Detect objects in images; the test-time pipeline of `freeanchor.inference`.

        Args:
            sources: one input or a list: image files, folders, globs, PIL images, numpy uint8
                [H, W, 3] arrays or uint8 [3, H, W] tensors (RGB; BGR with `bgr=True`).
            score_thr: minimum score (default `freeanchor.results.SCORE_THR`, 0.3, as `freeanchor
                predict`; None: the config's `score_thr`, 0.05, the threshold of evaluation).
            batch_size: images per forward pass (only images of one padded size share one,
                so results do not depend on the batch).
            max_pixels: refuse image files with more pixels (None = no limit).
            skip_unreadable: leave out unusable images (a warning each) instead of raising.

        Returns:
            one `Results` per image, in input order (folders and globs expanded in place).

        Raises:
            TypeError: an input of a type that is not accepted.
            ImageReadError: an unusable image (unless `skip_unreadable`).
        """
        single = isinstance(sources, (str, os.PathLike, Tensor, np.ndarray, Image.Image))
        inputs: list[ImageInput] = []
        for src in [sources] if single else list(sources):
            if isinstance(src, (str, os.PathLike)) and (
                Path(src).is_dir() or glob.has_magic(str(src))
            ):
                inputs += expand_sources([src])
            else:
                inputs.append(src)
        if batch_size < 1:
            raise OptionError(f"batch_size must be >= 1, got {batch_size}")
        device = next(self.parameters()).device
        names = self.cfg.class_names()

        def detect(batch: Tensor, metas: list[ImageMeta], thr: float | None):
            return self.detect(batch.to(device), metas, rescale=True, score_thr=thr)

        pipeline = Pipeline(self.cfg, detect, batch_size, max_pixels, bgr)
        results: dict[int, Results] = {}
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for out in pipeline.run(inputs, score_thr):
                    if isinstance(out, Skipped):
                        if not skip_unreadable:
                            raise ImageReadError(out.message)
                        warnings.warn(f"skipped: {out.message}", stacklevel=2)
                        continue
                    is_file = isinstance(out.source, (str, os.PathLike))
                    results[out.index] = Results(
                        boxes=out.boxes, scores=out.scores, labels=out.labels,
                        names=[names[i] for i in out.labels.tolist()],
                        path=str(out.source) if is_file else None,
                        orig_shape=out.meta.ori_shape, image=None if is_file else out.image,
                    )  # fmt: skip
        finally:
            self.train(was_training)
        return [results[i] for i in sorted(results)]


def build_loss(
    cfg: ModelConfig,
    box_coder: DeltaXYWHCoder | None = None,
    normalize: str = "local",
    imgs_per_gpu: int = 2,
) -> nn.Module:
    """The training loss `cfg.loss` names: "freeanchor" (learned matching, the default) or
    "retinanet" (max-IoU matching, focal + L1; use it with `cfg.target_stds` 1.0, RetinaNet's
    own coder, as `freeanchor.models.retinanet_loss.retinanet_config` sets).

    Args:
        box_coder: the coder the box targets are encoded with (default `cfg.target_stds`).
        normalize, imgs_per_gpu: "local" (per chunk of `imgs_per_gpu` images, the reference)
            or "global" (one normaliser for the batch).
    """
    coder = box_coder or DeltaXYWHCoder(cfg.target_stds)
    if cfg.loss == "retinanet":
        return RetinaNetLoss(cfg.num_classes, normalize=normalize, imgs_per_gpu=imgs_per_gpu,
                             box_coder=coder)  # fmt: skip
    return FreeAnchorLoss(
        cfg.num_classes,
        pre_anchor_topk=cfg.pre_anchor_topk,
        bbox_thr=cfg.bbox_thr,
        gamma=cfg.gamma,
        alpha=cfg.alpha,
        beta=cfg.beta,
        bbox_weight=cfg.bbox_weight,
        normalize=normalize,
        imgs_per_gpu=imgs_per_gpu,
        box_coder=coder,
    )


def build_model(
    name: str, num_classes: int = 80, pretrained_backbone: str | None = None
) -> FreeAnchor:
    """A freshly initialised detector of a named preset (see `freeanchor.config.PRESETS`).

    Args:
        pretrained_backbone: a local ImageNet state_dict file, or "torchvision" to download
            torchvision's ImageNet weights.
    """
    model = FreeAnchor(preset(name, num_classes))
    if pretrained_backbone:
        load_pretrained_backbone(model.backbone, pretrained_backbone)
    return model
