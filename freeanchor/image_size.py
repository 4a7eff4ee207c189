"""`--imgsz`: the one image-size convention of train, eval, predict, export and benchmark.

    --imgsz 1333,800   the image is resized, keeping its aspect ratio, to the largest size whose
                       long side is <= 1333 and short side <= 800 (MMDetection's `scale`, our
                       `model.input_scale`; the order of the two numbers does not matter)
    --imgsz 640        = 640,640: the long side becomes 640 (Ultralytics' `imgsz`)

Why this convention: it is the model's own setting (`model.input_scale`, MMDetection's
`Resize(scale=(1333, 800), keep_ratio=True)`), so a checkpoint's config, `freeanchor config`
and the flag all read the same; one number gives the bound Ultralytics users expect. Where a
command needs one fixed image (export's example input, benchmark's synthetic images) it uses
the largest landscape image the bound allows: long side x short side (W x H), padded for
export. The flags it replaces still work with a warning: `benchmark --size WxH`, `export --size
HxW`. `--set model.input_scale=LONG,SHORT` is the same setting and stays.

Imports no torch: the parser uses it.
"""

from __future__ import annotations

import argparse
import sys

from freeanchor.config_bounds import MAX_SIDE

HELP = (
    "image size: LONG,SHORT = resize (keeping the aspect ratio) to fit within LONG on the "
    "long side and SHORT on the short side, as MMDetection's scale (default 1333,800); one "
    "number N = N,N (long side N)"
)


def parse_imgsz(text: str) -> tuple[int, int]:
    """'1333,800' -> (1333, 800); '800,1333' -> (1333, 800); '640' -> (640, 640).

    Raises argparse.ArgumentTypeError (argparse prints it as one line, exit 2)."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or not all(1 <= s <= MAX_SIDE for s in sides):
        raise argparse.ArgumentTypeError(
            f"expected LONG,SHORT or one number (integers 1..{MAX_SIDE}, e.g. 1333,800 or 640), "
            f"got {text!r}"
        )
    if len(sides) == 1:
        sides = sides * 2
    return max(sides), min(sides)


class ImgszAction(argparse.Action):
    """Stores `--imgsz` as (long, short) in `imgsz`; on the commands that resolve a config
    (train, config) it also appends `model.input_scale=LONG,SHORT` to `--set`, in order, so a
    later `--set model.input_scale=...` wins; on benchmark it also sets its `size` (W x H)."""

    def __init__(self, *args, also: str | None = None, **kwargs) -> None:
        self.also = also
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        long_side, short_side = values
        setattr(namespace, self.dest, values)
        if self.also == "set":
            assignments = list(getattr(namespace, "set", None) or [])
            namespace.set = assignments + [f"model.input_scale={long_side},{short_side}"]
        elif self.also == "size":
            namespace.size = f"{long_side}x{short_side}"


class DeprecatedSize(argparse.Action):
    """The old `--size`: works as before, with a one-line warning naming `--imgsz`."""

    def __init__(self, *args, order: str = "WxH", **kwargs) -> None:
        self.order = order
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"freeanchor: warning: --size {self.order} is deprecated; use --imgsz LONG,SHORT "
            "(the resize bound, e.g. --imgsz 1333,800; see --help)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_imgsz(parser: argparse.ArgumentParser, also: str | None = None) -> None:
    """Add `--imgsz` to a subcommand (`also`: see ImgszAction)."""
    parser.add_argument(
        "--imgsz", type=parse_imgsz, action=ImgszAction, also=also, metavar="LONG,SHORT",
        default=None, help=HELP,
    )  # fmt: skip


def with_imgsz(cfg, imgsz: tuple[int, int] | None):
    """`cfg` (a ModelConfig) with `input_scale = imgsz`, or `cfg` itself when imgsz is None."""
    if imgsz is None:
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, input_scale=(max(imgsz), min(imgsz)))
