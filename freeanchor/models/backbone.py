"""Backbones returning C3, C4, C5 (strides 8, 16, 32), built on torchvision's definitions.

ResNet / ResNeXt keep torchvision's module names (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`downsample.0/1`), which are also MMDetection's, so ImageNet and MMDetection weights load by
name. torchvision's Bottleneck puts the stride on the 3x3 conv: MMDetection's "pytorch" style.

Freezing follows MMDetection (spec 2.1), not torchvision's FrozenBatchNorm: `frozen_stages=1`
stops gradients into the stem and `layer1`; `norm_eval` keeps every BatchNorm in eval mode
(running statistics used, never updated) while the affine weights of the later stages still
train. MobileNetV2's shared ImageNet weights have BN folded into the convs, so there every BN is
frozen outright.

Inference (eval mode) takes a faster path with the same weights and state_dict: each conv's
BatchNorm is folded into it on the fly (w * s, b - mean * s, s = gamma / sqrt(var + eps): one
small pass over the weights instead of one over every activation) and the activations are
channels_last (oneDNN's native layout on the CPU). Outputs equal the plain path's within float
rounding (~1e-5 on R-50 head outputs); training never takes this path. Below LEVERS_MIN_PIXELS
per call (batch x height x width) the plain path is faster and is taken: folding costs the same
at every size, and channels_last pays only on large maps (measured 2026-12-07, 2 CPU threads,
levers vs plain: R-18 0.85x at 8 x 96x96, 0.73x at 224x224, 1.00x at 320x320, 1.05x at 512x512;
R-50 0.84x, 0.78x, 1.02x, 1.15x).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from freeanchor.config import ModelConfig
from freeanchor.errors import (
    CheckpointError,
    ConfigError,
    FreeAnchorError,
    MissingFileError,
    OptionError,
)
from freeanchor.models.zoo import download, first_line

# name -> (block, blocks per stage, groups, width_per_group). resnet10 (one BasicBlock per stage)
# has no ImageNet weights: it is for training from scratch, where it learns as fast per step as
# resnet18 at ~60 % of its cost (the demo, measured 2026-12-07).
RESNETS: dict[str, tuple[type[nn.Module], list[int], int, int]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1], 1, 64),
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnext101_32x4d": (Bottleneck, [3, 4, 23, 3], 32, 4),
}

LEVERS_MIN_PIXELS = 320 * 320

# torchvision's ImageNet weights per backbone name (downloaded only on request).
_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "mobilenet_v2": "MobileNet_V2_Weights",
}


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """bn(conv(x)) in eval mode, as one conv with the BN folded into its weight and bias."""
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * s
    if conv.bias is not None:
        bias = bias + conv.bias * s
    w = conv.weight * s.reshape(-1, 1, 1, 1)
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _block_inference(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's Bottleneck / BasicBlock forward with folded BN (eval mode only)."""
    identity = x
    if block.downsample is not None:
        identity = conv_bn(x, block.downsample[0], block.downsample[1])
    out = torch.relu_(conv_bn(x, block.conv1, block.bn1))
    if isinstance(block, Bottleneck):
        out = torch.relu_(conv_bn(out, block.conv2, block.bn2))
        out = conv_bn(out, block.conv3, block.bn3)
    else:
        out = conv_bn(out, block.conv2, block.bn2)
    return torch.relu_(out.add_(identity))


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class ResNetBackbone(ResNet):
    """torchvision ResNet/ResNeXt without `avgpool`/`fc`; forward returns [C3, C4, C5].

    Args:
        name: one of "resnet10", "resnet18", "resnet34", "resnet50", "resnet101",
            "resnext101_32x4d".
        frozen_stages: 0 = nothing frozen; k >= 1 freezes the stem and layer1..layer_k.
        norm_eval: keep every BatchNorm in eval mode, also under `.train()`.

    `fold_bn` / `channels_last` (plain attributes, default True): the eval-mode levers of the
    module docstring; set False to run the plain torchvision path (benchmarks, tests).
    """

    fold_bn: bool = True
    channels_last: bool = True

    def __init__(self, name: str, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        block, layers, groups, width = RESNETS[name]
        super().__init__(block, layers, groups=groups, width_per_group=width)
        del self.avgpool, self.fc
        self.name = name
        expansion = block.expansion
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 1:
            return []
        stages = [self.layer1, self.layer2, self.layer3, self.layer4][: self.frozen_stages]
        return [self.conv1, self.bn1, *stages]

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        # As MMDetection's ResNet.train: frozen stages and (norm_eval) all BN stay in eval mode.
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            _set_bn_eval(self)
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [N, 3, H, W] -> [C3 [N, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]].

        In eval mode on inputs of at least LEVERS_MIN_PIXELS the outputs are channels_last
        (same shapes; see the module docstring).
        """
        if not self.training:
            return self._forward_inference(x)
        return self._forward_plain(x)

    def _forward_plain(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def _forward_inference(self, x: Tensor) -> list[Tensor]:
        if x.shape[0] * x.shape[-2] * x.shape[-1] < LEVERS_MIN_PIXELS:
            return self._forward_plain(x)
        # Not while exporting: a memory format makes the exporters guard on sizes being 1,
        # which breaks the dynamic batch / height / width of the ONNX graph.
        if self.channels_last and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.fold_bn:
            return self._forward_plain(x)
        x = self.maxpool(torch.relu_(conv_bn(x, self.conv1, self.bn1)))
        outs = []
        for layer in [self.layer1, self.layer2, self.layer3, self.layer4]:
            for block in layer:
                x = _block_inference(block, x)
            outs.append(x)
        return outs[1:]


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 `features` (keys `features.*`); returns C3, C4, C5 (32/96/1280 ch).

    Every BatchNorm is frozen (eval mode, no gradient): the offline ImageNet weights carry
    identity BN statistics with BN folded into the convs. `frozen_stages >= 1` also freezes the
    stem (features[0], features[1]).
    """

    out_channels = [32, 96, 1280]

    def __init__(self, frozen_stages: int = 1) -> None:
        super().__init__()
        self.name = "mobilenet_v2"
        self.features = mobilenet_v2().features
        self.frozen_stages = frozen_stages
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
        if frozen_stages >= 1:
            for p in self.features[:2].parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> MobileNetV2Backbone:
        super().train(mode)
        _set_bn_eval(self)
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [N, 3, H, W] -> [C3 (32 ch, stride 8), C4 (96, 16), C5 (1280, 32)]."""
        c3 = self.features[:7](x)
        c4 = self.features[7:14](c3)
        c5 = self.features[14:](c4)
        return [c3, c4, c5]


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone named by `cfg.backbone`, in train mode with `frozen_stages`/`norm_eval`."""
    if cfg.backbone == "mobilenet_v2":
        return MobileNetV2Backbone(cfg.frozen_stages)
    if cfg.backbone not in RESNETS:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}")
    return ResNetBackbone(cfg.backbone, cfg.frozen_stages, cfg.norm_eval)


def _torchvision_state_dict(name: str) -> dict[str, Tensor]:
    import torchvision.models as tvm

    if name not in _TORCHVISION_WEIGHTS:
        raise ConfigError(f"torchvision has no ImageNet weights for backbone {name!r}")
    weights = getattr(tvm, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1
    return weights.get_state_dict(progress=True)


def load_pretrained_backbone(backbone: nn.Module, path_or_name: str | Path) -> None:
    """Load ImageNet weights (torchvision key names) into a backbone, strictly.

    Args:
        path_or_name: a local state_dict file (`torch.load(weights_only=True)`; a
            `{"state_dict": ...}` wrapper is accepted), an http(s) URL of one (e.g. MMDetection's
            X-101-32x4d ImageNet weights, downloaded once), or "torchvision" to download
            torchvision's ImageNet weights for this backbone.

    `fc.*` / `classifier.*` (the ImageNet classifier) are ignored; any other missing,
    unexpected or mis-shaped key raises CheckpointError naming it.
    """
    try:
        source, state = _read_weights(backbone.name, path_or_name)
    except FreeAnchorError:
        raise
    except OSError as e:  # URLError, timeouts, refused connections: no network
        raise OptionError(_offline_message(backbone.name, str(path_or_name), e)) from None
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    own = backbone.state_dict()
    # Older ImageNet files lack BN's `num_batches_tracked`; BatchNorm fills it in on load.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = [f"missing key {k!r}" for k in missing[:3]]
        what += [f"unexpected key {k!r}" for k in unexpected[:3]]
        total = len(missing) + len(unexpected)
        raise CheckpointError(f"{source}: {'; '.join(what)} ({total} mismatched keys in all)")
    for k, v in own.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: key {k!r} has shape {tuple(state[k].shape)}, "
                f"the {backbone.name} backbone needs {tuple(v.shape)}"
            )
    backbone.load_state_dict(state, strict=True)


def _read_weights(name: str, path_or_name: str | Path) -> tuple[str, dict[str, Tensor]]:
    """(where from, state_dict) of a backbone weights file, URL or "torchvision"."""
    if str(path_or_name) == "torchvision":
        source = f"torchvision ImageNet weights for {name}"
        state = _torchvision_state_dict(name)
    else:
        path = Path(path_or_name)
        if str(path_or_name).startswith(("http://", "https://")):
            path = download(str(path_or_name))  # cached in the torch hub dir
        source = str(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: backbone weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
            raise CheckpointError(
                f"{path}: cannot load backbone weights ({first_line(e)})"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return source, state


def _offline_message(name: str, source: str, error: OSError) -> str:
    """A failed download as one line saying what to do instead."""
    url = source
    if source == "torchvision" and name in _TORCHVISION_WEIGHTS:
        import torchvision.models as tvm

        url = getattr(tvm, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url
    reason = str(getattr(error, "reason", None) or error).strip().splitlines()[0]
    return (
        f"--pretrained {source}: download failed ({reason}); download {url} on a machine "
        "with internet access and pass the file: --pretrained PATH"
    )
