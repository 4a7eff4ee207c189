"""The eval-mode backbone path (BatchNorm folded into the convs on the fly, channels_last)
computes the plain torchvision path's outputs, and leaves weights, state_dict and training
untouched."""

from __future__ import annotations

import pytest
import torch

from freeanchor.config import ModelConfig
from freeanchor.models.backbone import LEVERS_MIN_PIXELS, build_backbone


def _backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone=name))
    with torch.no_grad():  # non-trivial frozen statistics, so the fold has work to do
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return bb


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext101_32x4d"])
def test_folded_channels_last_equals_plain(name):
    bb = _backbone(name).eval()
    x = torch.randn(1, 3, 352, 320)  # at least LEVERS_MIN_PIXELS: the levers are taken
    with torch.inference_mode():
        fast = bb(x)
        bb.fold_bn = bb.channels_last = False
        plain = bb(x)
    for f, p in zip(fast, plain, strict=True):
        assert f.shape == p.shape and f.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4 * float(p.abs().max()))


def test_fold_changes_no_weight_and_training_takes_the_plain_path():
    bb = _backbone("resnet18")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bb.eval()(x)
    after = bb.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bb.train()
    out = bb(x)
    assert all(o.is_contiguous() for o in out)  # the plain path, standard layout
    out[-1].sum().backward()
    assert bb.layer4[0].bn1.weight.grad is not None  # BN affine weights still train


def test_small_inputs_take_the_plain_path():
    bb = _backbone("resnet18").eval()
    x = torch.randn(8, 3, 96, 96)  # the demo's evaluation batch: 73,728 pixels
    assert x.shape[0] * x.shape[2] * x.shape[3] < LEVERS_MIN_PIXELS
    with torch.inference_mode():
        small = bb(x)
        bb.fold_bn = bb.channels_last = False
        plain = bb(x)
    assert all(torch.equal(s, p) and s.is_contiguous() for s, p in zip(small, plain, strict=True))
