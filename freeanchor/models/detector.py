"""The FreeAnchor detector: backbone -> FPN -> RetinaNet head, trained with the FreeAnchor loss.

`forward` returns raw per-level head outputs (export-clean); `loss` adds anchors and the
FreeAnchor loss; `detect` adds the test-time post-processing; `predict` also reads and
preprocesses images and returns `Results`.

    model = build_model("freeanchor_r50_fpn_1x_coco", pretrained_backbone="torchvision")
    model = load_model("freeanchor_r50_fpn_1x_coco")  # MMDetection's released weights
    results = model.predict(["a.jpg", "b.jpg"], score_thr=0.3)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from freeanchor.config import ModelConfig, preset
from freeanchor.data.transforms import ImageMeta
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.backbone import build_backbone, load_pretrained_backbone
from freeanchor.models.box_coder import DeltaXYWHCoder
from freeanchor.models.fpn import FPN
from freeanchor.models.head import RetinaHead, flatten_head_outputs
from freeanchor.models.loss import FreeAnchorLoss
from freeanchor.models.postprocess import postprocess
from freeanchor.results import Results

ImageSource = str | Path | Tensor


class FreeAnchor(nn.Module):
    """RetinaNet-architecture detector with the FreeAnchor loss (MMDetection layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels, num_outs=len(cfg.strides))
        self.anchor_generator = AnchorGenerator(
            cfg.strides, cfg.ratios, cfg.octave_base_scale, cfg.scales_per_octave
        )
        self.head = RetinaHead(
            cfg.num_classes,
            in_channels=cfg.fpn_channels,
            feat_channels=cfg.feat_channels,
            stacked_convs=cfg.stacked_convs,
            num_anchors=self.anchor_generator.num_base_anchors,
            prior_prob=cfg.prior_prob,
        )
        self.box_coder = DeltaXYWHCoder(cfg.target_stds)
        self.loss_fn = FreeAnchorLoss(
            cfg.num_classes,
            pre_anchor_topk=cfg.pre_anchor_topk,
            bbox_thr=cfg.bbox_thr,
            gamma=cfg.gamma,
            alpha=cfg.alpha,
            beta=cfg.beta,
            bbox_weight=cfg.bbox_weight,
            box_coder=self.box_coder,
        )
        # Plain metadata a checkpoint carried (e.g. the dataset's "cat_ids"); see weights.py.
        self.extra: dict = {}
        # Anchors per (feature-map sizes, device); not a buffer, so the state_dict stays
        # exactly MMDetection's.
        self._anchor_cache: dict[tuple, list[Tensor]] = {}

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images [N, 3, H, W] (normalised, padded) -> (cls_scores, bbox_preds).

        cls_scores: per level P3..P7 [N, 9*C, H_l, W_l] logits; bbox_preds: [N, 36, H_l, W_l].
        """
        return self.head(self.fpn(self.backbone(images)))

    def anchors(
        self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device
    ) -> list[Tensor]:
        """Per-level anchors [H_l*W_l*9, 4] for these feature-map sizes (cached)."""
        key = (tuple(tuple(int(v) for v in s) for s in featmap_sizes), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 64:  # many input sizes (multi-scale): bound memory
                self._anchor_cache.clear()
            # Normal tensors even under inference_mode, so the cache also serves training.
            with torch.inference_mode(False):
                anchors = self.anchor_generator.grid_anchors(featmap_sizes, device)
            self._anchor_cache[key] = anchors
        return self._anchor_cache[key]

    def loss(
        self,
        images: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        num_gts: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """FreeAnchor loss of a batch.

        Args:
            images: [N, 3, H, W] normalised, padded.
            gt_boxes: per image [K_i, 4] xyxy in input pixels.
            gt_labels: per image [K_i] int64, 0-based.
            num_gts: with `loss_fn.normalize == "global"`, the gt count to normalise by (e.g.
                summed over all processes); default this batch's.

        Returns:
            {"positive_bag_loss": scalar, "negative_bag_loss": scalar}.
        """
        cls_scores, bbox_preds = self(images)
        logits, deltas = flatten_head_outputs(cls_scores, bbox_preds, self.cfg.num_classes)
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        anchors = torch.cat(self.anchors(sizes, images.device), dim=0)
        return self.loss_fn(logits, deltas, anchors, list(gt_boxes), list(gt_labels), num_gts)

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
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        return postprocess(
            cls_scores,
            bbox_preds,
            self.anchors(sizes, images.device),
            metas,
            self.box_coder,
            rescale=rescale,
            score_thr=self.cfg.score_thr if score_thr is None else score_thr,
            nms_pre=self.cfg.nms_pre,
            nms_iou=self.cfg.nms_iou,
            max_per_img=self.cfg.max_per_img,
        )

    def predict(
        self,
        sources: ImageSource | Sequence[ImageSource],
        score_thr: float | None = None,
        batch_size: int = 4,
    ) -> list[Results]:
        """Detect objects in image files or uint8 RGB [3, H, W] tensors.

        Runs in eval mode (the previous mode is restored) under `torch.inference_mode`.
        """
        from freeanchor.data.io import read_image
        from freeanchor.data.transforms import preprocess

        if isinstance(sources, (str, Path)) or (isinstance(sources, Tensor) and sources.dim() == 3):
            sources = [sources]
        sources = list(sources)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = self.cfg.class_names()
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        results: list[Results] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(sources), batch_size):
                    chunk = sources[start : start + batch_size]
                    images = [_as_image(s, read_image) for s in chunk]
                    batch, metas = preprocess(
                        images,
                        self.cfg.input_scale,
                        self.cfg.mean,
                        self.cfg.std,
                        self.cfg.size_divisor,
                    )
                    dets = self.detect(batch.to(device), metas, rescale=True, score_thr=score_thr)
                    for src, image, meta, det in zip(chunk, images, metas, dets):
                        labels = det["labels"].cpu()
                        results.append(
                            Results(
                                boxes=det["boxes"].cpu(),
                                scores=det["scores"].cpu(),
                                labels=labels,
                                names=[names[i] for i in labels.tolist()],
                                path=None if isinstance(src, Tensor) else str(src),
                                orig_shape=meta.ori_shape,
                                image=image if isinstance(src, Tensor) else None,
                            )
                        )
        finally:
            self.train(was_training)
        return results


def _as_image(source: ImageSource, read_image) -> Tensor:
    if isinstance(source, Tensor):
        if source.dim() != 3 or source.shape[0] != 3 or source.dtype != torch.uint8:
            raise ValueError(
                f"image tensors must be uint8 RGB [3, H, W], got {source.dtype} "
                f"{list(source.shape)}"
            )
        return source.cpu()
    return read_image(source)


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
