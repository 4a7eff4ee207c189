"""The `freeanchor` command line: parses arguments and dispatches; the work lives elsewhere.

    freeanchor demo [--out DIR]
    freeanchor train --model freeanchor_r50_fpn_1x_coco --train-ann A.json --train-images DIR ...
    freeanchor eval --weights W --ann A.json --images DIR [--json]
    freeanchor predict --weights W SOURCES... [--out DIR] [--save]
    freeanchor export --weights W --out model.onnx [--with-nms] [--dynamic]
    freeanchor convert SRC.pth DST
    freeanchor benchmark --model NAME [--device cpu|cuda] [--compare torchvision]
    freeanchor compare --losses freeanchor,retinanet --seeds 0,1,2 (--demo | --train-ann ...)
    freeanchor config [--model M] [--config FILE] [--set A.B=V ...] [--json]
    freeanchor data check SRC [--images DIR] [--split S] [--show N --out DIR] [--json]
    freeanchor data convert SRC --out FILE.json [--images DIR] [--split S]

Many GPUs / machines: `torchrun --nproc-per-node 8 -m freeanchor train ...` (see README).
A user's mistake (bad file, bad record, bad option) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from freeanchor.config import PRESETS
from freeanchor.errors import FreeAnchorError
from freeanchor.image_size import DeprecatedSize, add_imgsz
from freeanchor.results import SCORE_THR
from freeanchor.version import __version__

UserError = FreeAnchorError  # the old name
_MAX_PIXELS = 89_478_485  # = freeanchor.data.io.DEFAULT_MAX_PIXELS (Pillow's); not imported:
# the parser must not pull in torch


def _max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=int,
        default=_MAX_PIXELS,
        help="refuse images with more pixels, from the header before decoding "
        f"(default {_MAX_PIXELS:,}, Pillow's decompression-bomb limit; 0 = no limit)",
    )


def _tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: several scales (and flipped), merged before NMS",
    )
    p.add_argument(
        "--tta-scales",
        metavar="S[:L],...",
        help="TTA short sides (optionally :long max); default: the official FreeAnchor "
        "set 480:800,640:1067,...,1280:2133 for 1333x800 models, else the same "
        "factors (0.6..1.6) of the model's input scale",
    )
    p.add_argument("--no-tta-flip", action="store_true", help="TTA without the flipped passes")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: generate data, train, evaluate, draw")
    p.add_argument("--out", default="freeanchor_demo", help="output folder")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=None, help="training images to generate")
    p.add_argument("--num-val", type=int, default=None, help="validation images to generate")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores, 1 on a busy machine)")  # fmt: skip
    p.set_defaults(func=lambda a: _lazy("freeanchor.demo", "run_demo")(a))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train on COCO-format data (torchrun-aware)")
    p.add_argument("--config", help="a saved config.json to start from")
    p.add_argument(
        "--model",
        choices=sorted(PRESETS),
        help="preset (default freeanchor_r50_fpn_1x_coco; replaces --config's model)",
    )
    p.add_argument("--train-ann")
    p.add_argument("--train-images")
    p.add_argument("--val-ann")
    p.add_argument("--val-images")
    p.add_argument("--work-dir", help="default: the config's, else work_dirs/run")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="lr for the base batch (16); scaled linearly")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"])
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--pretrained", help="backbone weights: local path, or 'torchvision'")
    p.add_argument("--weights", help="initialise the whole detector from a checkpoint")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from WORK_DIR/last.pt (config: WORK_DIR/config.json + flags)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="A.B=VALUE",
        help="override any config field, e.g. --set train.warmup_iters=100",
    )
    add_imgsz(p, also="set")  # = --set model.input_scale=LONG,SHORT
    p.set_defaults(func=lambda a: _lazy("freeanchor.engine.train", "run_train")(a))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO box AP of a checkpoint")
    p.add_argument("--weights", required=True)
    p.add_argument("--ann", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", help="folder for results JSON, per-class table and PR curve")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["faster", "pycocotools"], default="faster")
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--json", action="store_true", help="last line: the metrics as one JSON object")
    add_imgsz(p)  # default: the checkpoint's model.input_scale
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept annotation image paths leading out of --images")  # fmt: skip
    _max_pixels(p)
    p.add_argument(
        "--analyze",
        action="store_true",
        help="confusion matrix, per-class P/R/AP, AP by size, worst images",
    )
    p.add_argument("--analyze-out", help="folder for the analysis (default OUT/analysis)")
    p.add_argument(
        "--analyze-score-thr",
        type=float,
        default=0.3,
        help="detections with a score >= this count in the analysis",
    )
    p.add_argument(
        "--analyze-worst",
        type=int,
        default=8,
        metavar="N",
        help="draw the N images with the most missed objects",
    )
    _tta(p)
    p.set_defaults(func=lambda a: _lazy("freeanchor.engine.evaluate", "run_eval")(a))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images")
    p.add_argument("sources", nargs="+", help="image files, folders or globs")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="a checkpoint (ours or MMDetection's)")
    g.add_argument("--onnx", help="an exported model.onnx (runs on onnxruntime)")
    p.add_argument("--out", default="predictions")
    p.add_argument("--score-thr", type=float, default=SCORE_THR,
                   help=f"smallest score kept (default {SCORE_THR}, as model.predict)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--save", action="store_true", help="also write images with boxes drawn")
    p.add_argument("--ann", help="COCO JSON whose image ids (matched by file name) to use")
    add_imgsz(p)  # default: the checkpoint's model.input_scale
    _max_pixels(p)
    _tta(p)
    p.set_defaults(func=lambda a: _lazy("freeanchor.predict", "run_predict")(a))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export backbone+FPN+head to ONNX")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", default="model.onnx")
    p.add_argument("--with-nms", action="store_true", help="put decoding + NMS in the graph")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    add_imgsz(p)  # default: the checkpoint's; the example input is its largest landscape image
    p.add_argument("--size", default=None, action=DeprecatedSize, order="HxW",
                   help="deprecated (use --imgsz): HxW of the example input")  # fmt: skip
    p.add_argument(
        "--score-thr",
        type=float,
        default=None,
        help="score threshold inside the --with-nms graph (default from config)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    p.add_argument(
        "--exporter",
        choices=["auto", "dynamo", "torchscript"],
        default="auto",
        help="auto: torch.export-based (dynamo), falling back to TorchScript",
    )
    p.set_defaults(func=lambda a: _lazy("freeanchor.export", "run_export")(a))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="MMDetection .pth (or ours) -> safetensors + JSON config")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=lambda a: _lazy("freeanchor.models.weights", "run_convert")(a))


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="inference fps, train step time and peak memory")
    p.add_argument("--model", default="freeanchor_r50_fpn_1x_coco", choices=sorted(PRESETS))
    p.add_argument("--weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    add_imgsz(p, also="size")  # images of LONG x SHORT (W x H), default 1333,800
    p.add_argument("--size", default="1333x800", action=DeprecatedSize, order="WxH",
                   help="deprecated (use --imgsz): WxH of the input")  # fmt: skip
    p.add_argument("--train", action="store_true", help="also measure a training step")
    p.add_argument("--compare", choices=["torchvision"], help="measure a peer in the same run")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--plain", action="store_true",
                   help="ours without eval-mode BN folding and channels_last (A/B)")  # fmt: skip
    p.add_argument("--onnx", action="store_true",
                   help="ours exported to ONNX and run on onnxruntime (inference)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads per model (default torch's)")
    p.set_defaults(func=lambda a: _lazy("freeanchor.tools.benchmark", "run_benchmark")(a))


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="FreeAnchor vs RetinaNet loss: same data, model, budget")
    p.add_argument("--losses", default="freeanchor,retinanet", help="comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; one run per loss and seed")
    p.add_argument("--out", default="compare", help="output folder (runs, table, plot, JSON)")
    p.add_argument("--demo", action="store_true", help="the demo's synthetic data and config")
    p.add_argument("--num-train", type=int, help="--demo: training images to generate")
    p.add_argument("--num-val", type=int, help="--demo: validation images to generate")
    p.add_argument("--iters", type=int, help="training iterations of every run (the budget)")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations (AP curve)")
    p.add_argument("--config", help="a saved config.json to start from (as train)")
    p.add_argument("--model", choices=sorted(PRESETS), help="preset, as train")
    for flag in ("--train-ann", "--train-images", "--val-ann", "--val-images", "--pretrained",
                 "--device", "--amp"):  # fmt: skip
        p.add_argument(flag, help="as train")
    p.add_argument("--epochs", type=int, help="as train")
    p.add_argument("--batch-size", type=int, help="as train")
    p.add_argument("--lr", type=float, help="as train")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field of every run, as train")  # fmt: skip
    add_imgsz(p, also="set")
    p.set_defaults(func=lambda a: _lazy("freeanchor.tools.compare", "run_compare")(a))


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the resolved config: each field's value, default, meaning"
    )
    p.add_argument(
        "--model", choices=sorted(PRESETS), help="preset (default r50; replaces --config's model)"
    )
    p.add_argument("--config", help="a saved config.json to start from")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="A.B=VALUE",
        help="override a field, as in train",
    )
    p.add_argument("--json", action="store_true", help="print the config as JSON (for --config)")
    add_imgsz(p, also="set")
    p.set_defaults(func=lambda a: _lazy("freeanchor.tools.config_info", "run_config")(a))


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset (COCO, YOLO, VOC) or convert it to COCO")
    actions = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="COCO .json, YOLO data.yaml or labels folder, VOC folder")
    common.add_argument("--images", help="image folder (COCO: required; else overrides)")
    common.add_argument("--split", default="train", help="split of a data.yaml / VOC folder")
    common.add_argument("--allow-outside-root", action="store_true",
                        help="accept image paths leading out of the image folder")  # fmt: skip
    c = actions.add_parser("check", parents=[common], help="counts, sizes, duplicates, anchors")
    c.add_argument("--model", default="freeanchor_r50_fpn_1x_coco", choices=sorted(PRESETS),
                   help="preset whose input size and anchors to measure coverage with")  # fmt: skip
    c.add_argument("--set", action="append", default=[], metavar="model.F=VALUE",
                   help="change a model field, e.g. --set model.octave_base_scale=2")  # fmt: skip
    add_imgsz(c, also="set")  # the input size anchor coverage is measured at
    c.add_argument("--show", type=int, default=0, metavar="N", help="draw N images' gt boxes")
    c.add_argument("--out", help="folder for report.json/.txt and the drawn images")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.add_argument("--no-hash", action="store_true", help="skip the duplicate-image search")
    v = actions.add_parser("convert", parents=[common], help="write the dataset as COCO JSON")
    v.add_argument("--out", required=True, help="the COCO instances .json to write")
    v.add_argument("--force", action="store_true", help="overwrite an existing --out")
    for q in (c, v):
        q.set_defaults(func=lambda a: _lazy("freeanchor.tools.data_check", "run_data")(a))


def _lazy(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeanchor", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"freeanchor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_eval, _add_predict, _add_export, _add_convert,
                _add_benchmark, _add_compare, _add_config, _add_data):  # fmt: skip
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except FreeAnchorError as e:
        # Raised for a user's input: one line naming the file, record or option. Anything
        # else is a bug in freeanchor and keeps its traceback.
        lines = str(e).strip().splitlines()
        message = lines[0] if lines else type(e).__name__
        print(f"freeanchor {args.command}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"freeanchor {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
