"""Make `tests/fixtures/postprocess_ties.pt`: MMDetection 3.3's post-processing of raw head
outputs whose scores tie a lot (saturated and quantised logits), for the tie-order test.

    PY=/tmp/mmdet-peer/mmdet-venv/bin/python          # MMDetection 3.3 (shared/peer/setup.sh)
    PYTHONPATH=../shared/peer $PY benchmarks/make_tie_fixture.py tests/fixtures/postprocess_ties.pt

Two images (one padded into the other's batch shape, rescaled), 3 classes, input 256x320. The
logits are integers (int8 in the file) so that thousands of scores tie exactly, a fifth of them
saturated (sigmoid rounds to 1.0); deltas are float16 values. The file holds the inputs and
MMDetection's `predict_by_feat` results (bboxes, scores, labels per image), plus versions.
"""

from __future__ import annotations

import sys

import torch


def main(out: str) -> None:
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    from peer_common import load_config, register_mmdet, versions

    torch.set_num_threads(2)
    register_mmdet()
    cfg = load_config("r50")
    head_cfg = cfg.model.bbox_head.copy()
    head_cfg.num_classes = 3
    head = MODELS.build(head_cfg).eval()
    test_cfg = ConfigDict(cfg.model.test_cfg)
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    cls_int, reg16 = [], []
    for h, w in sizes:
        logits = torch.randint(-6, 3, (2, 27, h, w), generator=g).float()
        saturated = torch.rand((2, 27, h, w), generator=g) < 0.2
        logits[saturated] = 40.0
        cls_int.append(logits.to(torch.int8))
        reg16.append((torch.randn((2, 36, h, w), generator=g) * 0.5).half())
    metas = [
        {"img_shape": (256, 320), "scale_factor": (0.5, 0.5), "ori_shape": (512, 640)},
        {"img_shape": (240, 180), "scale_factor": (0.75, 0.75), "ori_shape": (320, 240)},
    ]
    with torch.no_grad():
        results = head.predict_by_feat(
            [c.float() for c in cls_int], [r.float() for r in reg16],
            batch_img_metas=metas, cfg=test_cfg, rescale=True,
        )  # fmt: skip
    torch.save(
        {
            "cls_scores_int8": cls_int,
            "bbox_preds_fp16": reg16,
            "metas": metas,
            "test_cfg": {"nms_pre": 1000, "score_thr": 0.05, "nms_iou": 0.5, "max_per_img": 100},
            "results": [
                {"bboxes": r.bboxes, "scores": r.scores, "labels": r.labels} for r in results
            ],
            "versions": versions(),
        },
        out,
    )
    print(out, [len(r.scores) for r in results])


if __name__ == "__main__":
    main(sys.argv[1])
