"""Independent check: MMDetection 3.3's detections from the image file vs ours.

Two halves exchange plain files, so neither imports the other library:

    PEER=/tmp/mmdet-peer/mmdet-venv/bin/python             # MMDetection 3.3 (shared/peer/setup.sh)
    PYTHONPATH=../shared/peer $PEER benchmarks/mmdet_parity.py mmdet OUT   # checkpoints + results
    PYTHONPATH=. python benchmarks/mmdet_parity.py ours OUT                 # ours, the comparison

`mmdet` builds, for R-50, R-101 and X-101-32x4d, an MMDetection FreeAnchor model from the
config shipped with mmdet, gives it seeded random but non-trivial weights (R-50: the golden
`r50_state_dict_fp16.pt`; the others: mmdet's init, BatchNorm statistics measured on coco128
photos, head re-scaled so about a thousand class scores pass 0.05), saves it as a released-layout
checkpoint `{"meta", "state_dict"}` (`OUT/<arch>.pth`) and runs `mmdet.apis.inference_detector`
at the config's (1333, 800) scale on the test images (`OUT/<arch>_mmdet.pt`). The images:
coco128 colour JPEGs, its grey JPEG and a PNG written (losslessly) from one of the JPEGs.

`ours` loads each checkpoint with `freeanchor.load_model` and predicts the same files with
`FreeAnchor.predict`, then counts how many of MMDetection's 50 best detections per image have a
twin of ours (same label, IoU >= 0.95, score within 0.02; one-to-one, greedy by MMDetection's
rank). Writes `OUT/parity.json` and prints one line per architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO128 = SHARED / "data" / "coco128" / "images"
GOLDEN = SHARED / "golden" / "model"
COLOUR = ["000000000009", "000000000025", "000000000030", "000000000034", "000000000036",
          "000000000042", "000000000049", "000000000061"]  # fmt: skip
GREY = "000000000086"  # the grey (mode L) JPEG of coco128
ARCHS = ("r50", "r101", "x101")
TOPK, IOU, SCORE_TOL = 50, 0.95, 0.02


def image_paths(out: Path) -> list[Path]:
    return [COCO128 / f"{n}.jpg" for n in COLOUR + [GREY]] + [out / "from_jpeg.png"]


# ----------------------------------------------------------------------------- MMDetection side


def _mmdet_model(arch: str, seed: int):
    from mmdet.apis import init_detector
    from peer_common import load_config, register_mmdet

    register_mmdet()
    cfg = load_config(arch)
    cfg.model.backbone.init_cfg = None
    model = init_detector(cfg, None, device="cpu")
    if arch == "r50":
        sd16 = torch.load(GOLDEN / "r50_state_dict_fp16.pt", map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in sd16.items()}
        model.load_state_dict(state, strict=True)
        return model.eval()
    torch.manual_seed(seed)
    model.init_weights()
    head = model.bbox_head
    for conv in [*head.cls_convs, *head.reg_convs]:
        torch.nn.init.kaiming_normal_(conv.conv.weight, nonlinearity="relu")
        torch.nn.init.normal_(conv.conv.bias, 0.0, 0.05)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(bn.bias, 0.0, 0.2)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration images
    model.eval()
    calib = [COCO128 / f"{n}.jpg" for n in ("000000000064", "000000000071", "000000000072")]
    for bn in bns:
        bn.train()
    with torch.no_grad():
        for path in calib:
            model.extract_feat(_mmdet_inputs(model, path))
    model.eval()
    with torch.no_grad():  # head scales: deltas std ~0.5, ~1000 class scores > 0.05
        feats = model.extract_feat(_mmdet_inputs(model, calib[0]))
        cls, reg = head(feats)
        head.retina_reg.weight *= 0.5 / torch.cat([r.flatten() for r in reg]).std()
        head.retina_reg.bias.zero_()
        logits = torch.cat([c.flatten() for c in cls])
        shift = torch.logit(torch.tensor(0.05)) - logits.topk(1000).values[-1]
        head.retina_cls.bias += shift + 0.3 * torch.randn_like(head.retina_cls.bias)
    return model


def _mmdet_inputs(model, path: Path):
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    pipeline = Compose(get_test_pipeline_cfg(model.cfg.copy()))
    data = pipeline(dict(img_path=str(path), img_id=0))
    batch = model.data_preprocessor({"inputs": [data["inputs"]],
                                     "data_samples": [data["data_samples"]]}, False)  # fmt: skip
    return batch["inputs"]


def run_mmdet(out: Path, seed: int) -> None:
    import cv2
    from mmdet.apis import inference_detector

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "from_jpeg.png"
    cv2.imwrite(str(png), cv2.imread(str(COCO128 / f"{COLOUR[1]}.jpg"), cv2.IMREAD_COLOR))
    for arch in ARCHS:
        model = _mmdet_model(arch, seed)
        meta = {"dataset_meta": {"classes": list(model.dataset_meta["classes"])},
                "note": f"seeded random weights ({arch}, seed {seed}), parity check"}  # fmt: skip
        torch.save({"meta": meta, "state_dict": model.state_dict()}, out / f"{arch}.pth")
        results = {}
        for path in image_paths(out):
            pred = inference_detector(model, str(path)).pred_instances
            results[path.name] = {"bboxes": pred.bboxes.float(), "scores": pred.scores.float(),
                                  "labels": pred.labels.long()}  # fmt: skip
            print(
                f"{arch} {path.name}: {len(pred.scores)} detections, best "
                f"{float(pred.scores.max()) if len(pred.scores) else 0:.3f}",
                flush=True,
            )
        torch.save(results, out / f"{arch}_mmdet.pt")


# ----------------------------------------------------------------------------- our side


def matched(theirs: dict, boxes, scores, labels) -> int:
    """MMDetection's TOPK best with a twin of ours (label, IoU, score), one-to-one."""
    from torchvision.ops import box_iou

    order = theirs["scores"].argsort(descending=True)[:TOPK]
    t_boxes, t_scores = theirs["bboxes"][order], theirs["scores"][order]
    t_labels = theirs["labels"][order]
    if len(boxes) == 0:
        return 0
    iou = box_iou(t_boxes, boxes)
    free = torch.ones(len(boxes), dtype=torch.bool)
    n = 0
    for i in range(len(order)):
        ok = (labels == t_labels[i]) & (iou[i] >= IOU) & ((scores - t_scores[i]).abs() <= SCORE_TOL)
        ok &= free
        if ok.any():
            free[int(torch.where(ok)[0][iou[i][ok].argmax()])] = False
            n += 1
    return n


def run_ours(out: Path) -> None:
    from freeanchor import load_model

    torch.set_num_threads(2)
    report = {}
    for arch in ARCHS:
        model = load_model(out / f"{arch}.pth")
        theirs = torch.load(out / f"{arch}_mmdet.pt", weights_only=True)
        paths = image_paths(out)
        results = model.predict(paths, score_thr=model.cfg.score_thr, batch_size=1)
        per_image, total, hits, bitwise = {}, 0, 0, 0
        for path, res in zip(paths, results, strict=True):
            ref = theirs[path.name]
            n = matched(ref, res.boxes, res.scores, res.labels)
            bitwise += all(
                torch.equal(a, b)
                for a, b in ((ref["bboxes"], res.boxes), (ref["scores"], res.scores),
                             (ref["labels"], res.labels))
            )  # fmt: skip
            k = min(TOPK, len(ref["scores"]))
            per_image[path.name] = [n, k]
            total, hits = total + k, hits + n
        report[arch] = {"matched": hits, "of": total, "rate": hits / max(total, 1),
                        "bitwise_equal_images": bitwise, "per_image": per_image}  # fmt: skip
        print(
            f"{arch}: {hits}/{total} of MMDetection's top-{TOPK} detections matched "
            f"({hits / max(total, 1):.1%}); {bitwise}/{len(paths)} images bitwise equal (all "
            f"boxes, scores, labels); per image {per_image}",
            flush=True,
        )
    (out / "parity.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=["mmdet", "ours"])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.side == "mmdet":
        run_mmdet(args.out, args.seed)
    else:
        run_ours(args.out)


if __name__ == "__main__":
    sys.exit(main())
