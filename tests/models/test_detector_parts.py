"""The detector's parts as arguments: the loss chosen by config, a user-defined head, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from freeanchor.config import preset
from freeanchor.data.transforms import ImageMeta
from freeanchor.models.detector import FreeAnchor, build_loss
from freeanchor.models.loss import FreeAnchorLoss
from freeanchor.models.retinanet_loss import RETINANET_STDS, RetinaNetLoss, retinanet_config

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    # Several intra-op threads on a shared CPU cost 20x in contention for these tiny steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(loss: str = "freeanchor"):
    cfg = preset("freeanchor_r18_fpn_1x", num_classes=2)
    cfg.fpn_channels = cfg.feat_channels = 32
    cfg.stacked_convs = 1
    cfg.octave_base_scale, cfg.pre_anchor_topk = 2.0, 10  # 16..~80 px anchors for 64 px
    cfg.frozen_stages, cfg.norm_eval = 0, False
    cfg.input_scale = (SIZE, SIZE)
    return retinanet_config(cfg) if loss == "retinanet" else cfg


class TinyHead(nn.Module):
    """A user's head: one shared 3x3 conv, then 1x1 class and box convs (9 anchors)."""

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int = 9) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.cls = nn.Conv2d(16, num_anchors * num_classes, 1)
        self.reg = nn.Conv2d(16, num_anchors * 4, 1)
        nn.init.constant_(self.cls.bias, -math.log(99))  # prior 0.01

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [torch.relu(self.conv(f)) for f in feats]
        return [self.cls(h) for h in hidden], [self.reg(h) for h in hidden]


def _batch():
    """Two 64 px images, each with a bright square (class 0) or a dark one (class 1)."""
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[0, :, 8:40, 10:42] = 2.0
    images[1, :, 20:60, 4:36] = -2.0
    boxes = [torch.tensor([[10.0, 8, 42, 40]]), torch.tensor([[4.0, 20, 36, 60]])]
    labels = [torch.tensor([0]), torch.tensor([1])]
    return images, boxes, labels


def _train(model: FreeAnchor, steps: int = 25) -> list[float]:
    torch.manual_seed(0)
    images, boxes, labels = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = sum(model.loss(images, boxes, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_config_picks_the_loss_and_its_coder():
    fa = FreeAnchor(_cfg())
    assert type(fa.loss_fn) is FreeAnchorLoss and fa.box_coder.stds == (0.1, 0.1, 0.2, 0.2)
    rn = FreeAnchor(_cfg("retinanet"))
    assert type(rn.loss_fn) is RetinaNetLoss
    # training encodes and test time decodes with the same coder: RetinaNet's stds 1.0
    assert rn.box_coder.stds == rn.loss_fn.box_coder.stds == RETINANET_STDS
    assert _cfg("retinanet").num_classes == 2 and _cfg().loss == "freeanchor"  # a copy


def test_a_given_loss_brings_its_coder_for_decoding():
    model = FreeAnchor(_cfg(), loss=RetinaNetLoss(2))
    assert model.box_coder is model.loss_fn.box_coder
    assert model.box_coder.stds == RETINANET_STDS


def test_normaliser_settings_reach_the_loss_at_construction():
    for loss in ("freeanchor", "retinanet"):
        model = FreeAnchor(_cfg(loss), normalize="global", imgs_per_gpu=4)
        assert (model.loss_fn.normalize, model.loss_fn.imgs_per_gpu) == ("global", 4)
        built = build_loss(_cfg(loss), normalize="local", imgs_per_gpu=3)
        assert (built.normalize, built.imgs_per_gpu) == ("local", 3)


def test_a_given_loss_changes_no_weight():
    # the parts are built in the same order whatever is passed: the same seed, same weights
    torch.manual_seed(7)
    a = FreeAnchor(_cfg()).state_dict()
    torch.manual_seed(7)
    b = FreeAnchor(_cfg(), loss=RetinaNetLoss(2)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["freeanchor", "retinanet"])
def test_each_loss_trains_a_tiny_model(loss):
    torch.manual_seed(0)
    losses = _train(FreeAnchor(_cfg(loss)))
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


@pytest.mark.parametrize("loss", ["freeanchor", "retinanet"])
def test_a_custom_head_trains_with_either_loss_and_detects(loss):
    cfg = _cfg(loss)
    torch.manual_seed(0)
    head = TinyHead(cfg.fpn_channels, cfg.num_classes)
    model = FreeAnchor(cfg, head=head)
    assert model.head is head and "head.conv.weight" in model.state_dict()
    before = head.conv.weight.detach().clone()
    losses = _train(model)
    assert not torch.equal(before, head.conv.weight)  # the user's head learned
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    model.eval()
    images, _, _ = _batch()
    meta = ImageMeta((SIZE, SIZE), (SIZE, SIZE), (1.0, 1.0))
    dets = model.detect(images, [meta, meta], score_thr=0.0)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
