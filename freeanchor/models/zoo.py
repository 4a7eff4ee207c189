"""The model zoo and downloads: MMDetection's released FreeAnchor checkpoints by name.

A leaf module (torch and the error types only), so that the backbone's ImageNet weights and the
detector's checkpoints are fetched by the same code without importing each other.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from freeanchor.errors import CheckpointError

_MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/free_anchor/"
# name -> (url, sha256 prefix from the file name, preset)
ZOO: dict[str, tuple[str, str, str]] = {
    "freeanchor_r50_fpn_1x_coco": (
        _MMDET_URL + "retinanet_free_anchor_r50_fpn_1x_coco/"
        "retinanet_free_anchor_r50_fpn_1x_coco_20200130-0f67375f.pth",
        "0f67375f",
        "freeanchor_r50_fpn_1x_coco",
    ),
    "freeanchor_r101_fpn_1x_coco": (
        _MMDET_URL + "retinanet_free_anchor_r101_fpn_1x_coco/"
        "retinanet_free_anchor_r101_fpn_1x_coco_20200130-358324e6.pth",
        "358324e6",
        "freeanchor_r101_fpn_1x_coco",
    ),
    "freeanchor_x101-32x4d_fpn_1x_coco": (
        _MMDET_URL + "retinanet_free_anchor_x101_32x4d_fpn_1x_coco/"
        "retinanet_free_anchor_x101_32x4d_fpn_1x_coco_20200130-d4846968.pth",
        "d4846968",
        "freeanchor_x101-32x4d_fpn_1x_coco",
    ),
}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def download(url: str, hash_prefix: str | None = None) -> Path:
    """Fetch `url` into `<torch hub dir>/checkpoints/` once; check the sha256 prefix.

    Without `hash_prefix`, a `-<hex>.` suffix in the file name (torch hub's convention) is used.

    Raises:
        CheckpointError: the download or the hash check failed (names the URL).
    """
    filename = url.rsplit("/", 1)[-1].split("?")[0]
    if hash_prefix is None:
        m = re.search(r"-([a-f0-9]{6,})\.", filename)
        hash_prefix = m.group(1) if m else None
    dst = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes a temporary file and renames it only after the hash check passed.
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=True)
    except Exception as e:  # noqa: BLE001 - network and hash errors alike end the command
        raise CheckpointError(f"{url}: download failed ({first_line(e)})") from None
    return dst
