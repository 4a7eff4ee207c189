"""Backbones: architecture against MMDetection's key lists and counts, freezing, weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from freeanchor.config import ModelConfig, preset
from freeanchor.errors import ConfigError
from freeanchor.models.backbone import build_backbone, load_pretrained_backbone
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.weights import to_mmdet_key

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"

# spec 4.1: (total, trainable with frozen_stages=1) parameters of the MMDetection seed models.
SEEDS = {
    "freeanchor_r50_fpn_1x_coco": ("r50", 37_968_692, 37_743_348),
    "freeanchor_r101_fpn_1x_coco": ("r101", 56_960_820, 56_735_476),
    "freeanchor_x101-32x4d_fpn_1x_coco": ("x101", 56_589_364, 56_374_004),
}


def _meta_model(name: str) -> FreeAnchor:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return FreeAnchor(preset(name))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_parameter_counts_match_mmdetection(name):
    _, total, trainable = SEEDS[name]
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_state_dict_equals_mmdetection_keys(name):
    keys_file = SHARED / "golden" / "model" / f"{SEEDS[name][0]}_keys.json"
    if not keys_file.is_file():
        pytest.skip(f"golden fixture not present: {keys_file}")
    reference = json.loads(keys_file.read_text())
    ours = {to_mmdet_key(k): list(v.shape) for k, v in _meta_model(name).state_dict().items()}
    assert list(ours) == list(reference)  # same names in the same order
    assert ours == reference


def test_resnext_is_32x4d_pytorch_style():
    backbone = build_backbone(ModelConfig(backbone="resnext101_32x4d"))
    block = backbone.layer2[0]
    assert block.conv2.groups == 32
    assert tuple(backbone.layer1[0].conv2.weight.shape) == (128, 4, 3, 3)
    # "pytorch" style: the stride-2 of a downsampling block is on the 3x3 conv
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


@pytest.mark.parametrize(
    "name, channels",
    [
        ("resnet10", [128, 256, 512]),
        ("resnet18", [128, 256, 512]),
        ("resnet34", [128, 256, 512]),
        ("resnet50", [512, 1024, 2048]),
        ("mobilenet_v2", [32, 96, 1280]),
    ],
)
def test_outputs_c3_c4_c5(name, channels):
    backbone = build_backbone(ModelConfig(backbone=name)).eval()
    assert backbone.out_channels == channels
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, channels[0], 8, 12),
        (1, channels[1], 4, 6),
        (1, channels[2], 2, 3),
    ]
    assert not hasattr(backbone, "fc")


def test_resnet10_is_torchvision_resnet_with_one_block_per_stage():
    """resnet10 = torchvision's ResNet(BasicBlock, [1, 1, 1, 1]): same keys, same C3-C5."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    ours = build_backbone(ModelConfig(backbone="resnet10", frozen_stages=0)).eval()
    peer = ResNet(BasicBlock, [1, 1, 1, 1]).eval()
    assert all(len(getattr(ours, f"layer{i}")) == 1 for i in range(1, 5))
    missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        c5 = ours(x)[2]
        y = peer.maxpool(peer.relu(peer.bn1(peer.conv1(x))))
        y = peer.layer4(peer.layer3(peer.layer2(peer.layer1(y))))
    assert torch.allclose(c5, y, atol=1e-5)


def test_resnet10_has_no_torchvision_weights():
    backbone = build_backbone(ModelConfig(backbone="resnet10"))
    with pytest.raises(ConfigError, match="no ImageNet weights for backbone 'resnet10'"):
        load_pretrained_backbone(backbone, "torchvision")


def _bns(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_norm_eval_and_frozen_stages_resnet50():
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone="resnet50"))
    backbone.train()
    assert backbone.training
    assert all(not bn.training for bn in _bns(backbone))
    before = {
        k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "num_b" in k
    }
    feats = backbone(torch.randn(2, 3, 64, 64))
    after = backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # stats never updated

    frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    for m in (backbone.layer2, backbone.layer3, backbone.layer4):
        assert all(p.requires_grad for p in m.parameters())
    # BN affine of stage 2 trains (MMDetection), unlike torchvision's FrozenBatchNorm2d.
    sum(f.sum() for f in feats).backward()
    assert backbone.layer2[0].bn1.weight.grad is not None
    assert backbone.layer2[0].bn1.weight.grad.abs().sum() > 0
    assert backbone.layer1[0].conv1.weight.grad is None


def test_norm_eval_off_and_no_frozen_stages():
    backbone = build_backbone(ModelConfig(backbone="resnet18", frozen_stages=0, norm_eval=False))
    backbone.train()
    assert all(bn.training for bn in _bns(backbone))
    assert all(p.requires_grad for p in backbone.parameters())
    mean = backbone.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32))
    assert not torch.equal(mean, backbone.bn1.running_mean)


def test_mobilenet_bn_frozen_and_stem_frozen():
    backbone = build_backbone(ModelConfig(backbone="mobilenet_v2"))
    backbone.train()
    assert all(not bn.training for bn in _bns(backbone))
    assert all(not p.requires_grad for bn in _bns(backbone) for p in bn.parameters())
    assert all(not p.requires_grad for p in backbone.features[:2].parameters())
    assert backbone.features[2].conv[0][0].weight.requires_grad


def test_load_pretrained_mobilenet_from_shared_weights():
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"pretrained weights not present: {MOBILENET_WEIGHTS}")
    backbone = build_backbone(ModelConfig(backbone="mobilenet_v2"))
    load_pretrained_backbone(backbone, MOBILENET_WEIGHTS)
    state = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    assert any(k.startswith("classifier.") for k in state)  # present in the file, ignored
    own = backbone.state_dict()
    assert set(own) == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(own[k], state[k]) for k in own)


def _torchvision_resnet18_file(tmp_path: Path) -> tuple[Path, dict]:
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18().state_dict()  # torchvision names, fc.* included
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_load_pretrained_resnet18_ignores_fc(tmp_path):
    path, state = _torchvision_resnet18_file(tmp_path)
    backbone = build_backbone(ModelConfig(backbone="resnet18"))
    load_pretrained_backbone(backbone, path)
    own = backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in own.items())
    # frozen stages stay frozen after loading
    assert not backbone.layer1[0].conv1.weight.requires_grad


@pytest.mark.parametrize(
    "change, key",
    [
        ("missing", "layer3.1.bn2.running_var"),
        ("unexpected", "layer5.0.conv1.weight"),
        ("shape", "layer2.0.conv1.weight"),
    ],
)
def test_load_pretrained_rejects_bad_keys(tmp_path, change, key):
    path, state = _torchvision_resnet18_file(tmp_path)
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5, 5, 1, 1)
    torch.save(state, path)
    backbone = build_backbone(ModelConfig(backbone="resnet18"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        load_pretrained_backbone(backbone, path)
    assert str(path) in str(info.value)


def test_load_pretrained_missing_file(tmp_path):
    backbone = build_backbone(ModelConfig(backbone="resnet18"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained_backbone(backbone, tmp_path / "nope.pth")
