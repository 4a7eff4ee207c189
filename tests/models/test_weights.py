"""Checkpoints: our safetensors format, MMDetection files, engine checkpoints, zoo, convert CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import freeanchor.models.weights as weights
from freeanchor.cli import main
from freeanchor.config import COCO_CLASSES, Config, ModelConfig, to_dict
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.weights import (
    ZOO,
    CheckpointError,
    from_mmdet_key,
    load_model,
    save_model,
    to_mmdet_key,
)

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def small_model() -> FreeAnchor:
    torch.manual_seed(0)
    model = FreeAnchor(ModelConfig(backbone="resnet18", num_classes=3, classes=list(CLASSES)))
    with torch.no_grad():  # non-default BN statistics, so that a lost buffer would show
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def small_input() -> torch.Tensor:
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def _outputs(model: FreeAnchor, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        cls_scores, bbox_preds = model(x)
    return cls_scores + bbox_preds


def _assert_same_model(a: FreeAnchor, b: FreeAnchor, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for u, v in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(u, v)


def _mmdet_file(model: FreeAnchor, path: Path, meta: dict | None = None, edit=None) -> Path:
    state = {to_mmdet_key(k): v for k, v in model.state_dict().items()}
    if edit:
        edit(state)
    torch.save({"meta": meta if meta is not None else {}, "state_dict": state}, path)
    return path


# ----------------------------------------------------------------------------- our format


def test_round_trip(small_model, small_input, tmp_path):
    path = save_model(small_model, tmp_path / "m.safetensors", extra={"cat_ids": [1, 5, 9]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp left
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # plain safetensors, config in the header
        assert json.loads(f.metadata()["config"])["classes"] == CLASSES
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.cfg == small_model.cfg
    assert loaded.extra == {"cat_ids": [1, 5, 9]}
    _assert_same_model(small_model, loaded, small_input)


def test_save_rejects_non_json_extra(small_model, tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_model(small_model, tmp_path / "m.safetensors", extra={"x": object()})
    assert not any(tmp_path.iterdir())


def test_engine_checkpoint(small_model, small_input, tmp_path):
    cfg = Config(model=small_model.cfg)
    for i, config in enumerate([to_dict(cfg), to_dict(cfg.model)]):  # Config or ModelConfig
        state = {f"module.{k}": v for k, v in small_model.state_dict().items()}  # DDP-saved
        path = tmp_path / f"last{i}.pt"
        torch.save({"model": state, "optimizer": {}, "epoch": 3, "config": config}, path)
        _assert_same_model(small_model, load_model(path), small_input)


# ----------------------------------------------------------------------------- MMDetection


def test_key_mapping():
    assert from_mmdet_key("neck.lateral_convs.0.conv.weight") == "fpn.lateral_convs.0.weight"
    assert from_mmdet_key("neck.fpn_convs.3.conv.bias") == "fpn.fpn_convs.3.bias"
    assert from_mmdet_key("bbox_head.cls_convs.2.conv.weight") == "head.cls_convs.2.weight"
    assert from_mmdet_key("bbox_head.retina_reg.bias") == "head.retina_reg.bias"
    assert from_mmdet_key("backbone.layer1.0.downsample.1.running_var") == (
        "backbone.layer1.0.downsample.1.running_var"
    )
    assert from_mmdet_key("data_preprocessor.mean") is None
    for k in ("fpn.fpn_convs.4.weight", "head.reg_convs.0.bias", "backbone.bn1.weight"):
        assert from_mmdet_key(to_mmdet_key(k)) == k


def test_mmdet_checkpoint_infers_architecture(small_model, small_input, tmp_path):
    path = _mmdet_file(small_model, tmp_path / "r18.pth", meta={"CLASSES": tuple(CLASSES)})
    loaded = load_model(path)
    assert loaded.cfg.backbone == "resnet18" and loaded.cfg.num_classes == 3
    assert loaded.cfg.classes == CLASSES
    _assert_same_model(small_model, loaded, small_input)


def test_mmdet_80_classes_without_meta_get_coco_names(tmp_path):
    model = FreeAnchor(ModelConfig(backbone="resnet18"))
    loaded = load_model(_mmdet_file(model, tmp_path / "coco.pth"))
    assert loaded.cfg.classes == list(COCO_CLASSES)


def test_mmdet_wrong_number_of_class_names(small_model, tmp_path):
    path = _mmdet_file(small_model, tmp_path / "x.pth", meta={"CLASSES": ("a", "b")})
    with pytest.raises(CheckpointError, match="2 class names"):
        load_model(path)


def _drop(key):
    return lambda s: s.pop(key)


def _add(key):
    return lambda s: s.__setitem__(key, torch.zeros(2))


def _reshape(key):
    return lambda s: s.__setitem__(key, torch.zeros(7, *s[key].shape[1:]))


@pytest.mark.parametrize(
    "edit, key, problem",
    [
        (_drop, "neck.fpn_convs.4.conv.bias", "missing"),
        (_drop, "backbone.layer2.1.bn2.running_mean", "missing"),
        (_add, "bbox_head.extra_conv.weight", "unexpected"),
        (_add, "roi_head.fc.weight", "unexpected"),
        (_reshape, "bbox_head.cls_convs.1.conv.weight", "shape"),
        (_reshape, "backbone.layer3.0.conv1.weight", "shape"),
    ],
)
def test_mmdet_bad_keys_named(small_model, tmp_path, edit, key, problem):
    path = _mmdet_file(small_model, tmp_path / "bad.pth", edit=edit(key))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert repr(key) in message and str(path) in message and problem in message


def test_weights_only_refuses_pickled_objects(small_model, tmp_path):
    path = tmp_path / "evil.pth"
    state = {to_mmdet_key(k): v for k, v in small_model.state_dict().items()}
    torch.save({"meta": {"hook": _Marker()}, "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not _Marker.unpickled  # nothing of the file was executed


class _Marker:
    unpickled = False

    def __reduce__(self):
        return (_mark_unpickled, ())


def _mark_unpickled():
    _Marker.unpickled = True
    return None


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_model(junk)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_model(tmp_path / "absent.pth")
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_model(tensor_file)


# ----------------------------------------------------------------------------- zoo / URL


def test_zoo_entries_match_spec_urls():
    assert set(ZOO) == {
        "freeanchor_r50_fpn_1x_coco",
        "freeanchor_r101_fpn_1x_coco",
        "freeanchor_x101-32x4d_fpn_1x_coco",
    }
    for url, prefix, _ in ZOO.values():
        assert url.startswith("https://download.openmmlab.com/mmdetection/v2.0/free_anchor/")
        assert url.endswith(f"-{prefix}.pth") and len(prefix) == 8


def test_zoo_name_downloads_and_checks_preset(golden_mmdet_r50_checkpoint, monkeypatch):
    calls = []

    def fake_download(url, hash_prefix=None):
        calls.append((url, hash_prefix))
        return golden_mmdet_r50_checkpoint

    monkeypatch.setattr(weights, "download", fake_download)
    model = load_model("freeanchor_r50_fpn_1x_coco")
    assert calls == [ZOO["freeanchor_r50_fpn_1x_coco"][:2]]
    assert model.cfg.backbone == "resnet50"
    with pytest.raises(CheckpointError, match="expected resnet101"):
        load_model("freeanchor_r101_fpn_1x_coco")  # an R-50 file where R-101 is promised


def test_url_download_goes_to_hub_cache_once(small_model, tmp_path, monkeypatch):
    src = _mmdet_file(small_model, tmp_path / "src.pth", meta={"CLASSES": CLASSES})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def fake_fetch(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(src.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_fetch)
    url = "https://example.org/models/freeanchor_r18-abcdef12.pth"
    load_model(url)
    load_model(url)  # second time from the cache
    assert calls == [(url, "abcdef12")]
    assert (tmp_path / "hub" / "checkpoints" / "freeanchor_r18-abcdef12.pth").is_file()

    def failing_fetch(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError('invalid hash value (expected "abcdef12", got "00000000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_fetch)
    with pytest.raises(CheckpointError, match="invalid hash"):
        load_model("https://example.org/models/other-abcdef12.pth")


# ----------------------------------------------------------------------------- convert CLI


def test_convert_cli_on_mmdet_checkpoint(golden_mmdet_r50_checkpoint, tmp_path, capsys):
    dst = tmp_path / "r50.safetensors"
    assert main(["convert", str(golden_mmdet_r50_checkpoint), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    ours, theirs = load_model(dst), load_model(golden_mmdet_r50_checkpoint)
    assert ours.cfg == theirs.cfg and ours.cfg.classes[0] == "person"
    assert ours.extra["source"] == golden_mmdet_r50_checkpoint.name
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _assert_same_model(ours, theirs, x)


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.pth" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02garbage")
    assert main(["convert", str(junk), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "junk.pth" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_read_checkpoint_returns_data_and_the_detector_builds_itself(small_model, tmp_path):
    """Checkpoint I/O builds no model: it returns config + state + extra."""
    from freeanchor.models.weights import Checkpoint, read_checkpoint

    path = save_model(small_model, tmp_path / "m.safetensors", extra={"cat_ids": [1, 2, 3]})
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.cfg == small_model.cfg
    assert ckpt.extra == {"cat_ids": [1, 2, 3]} and set(ckpt.state) == set(small_model.state_dict())
    model = FreeAnchor.from_checkpoint(ckpt)
    for k, v in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    ckpt.state.pop(next(iter(ckpt.state)))
    with pytest.raises(CheckpointError, match="missing key"):
        FreeAnchor.from_checkpoint(ckpt)


# ----------------------------------------------------------------------------- integrity


def _flip_in_payload(path: Path, tensor: torch.Tensor) -> None:
    """Flip one byte inside `tensor`'s bytes in the file (found by value)."""
    data = bytearray(path.read_bytes())
    at = bytes(data).index(tensor.contiguous().numpy().tobytes())
    data[at + 3] ^= 0x5A
    path.write_bytes(bytes(data))


def test_safetensors_checksum_refuses_a_flipped_byte(small_model, tmp_path):
    path = save_model(small_model, tmp_path / "m.safetensors", extra={})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["checksum"].startswith("blake2b-256:")
    load_model(path)
    _flip_in_payload(path, small_model.state_dict()["head.retina_cls.weight"])
    with pytest.raises(CheckpointError, match=r"m.safetensors: checksum mismatch"):
        load_model(path)


def test_safetensors_without_checksum_still_loads(small_model, small_input, tmp_path):
    # ours from before checksums: the same header without the "checksum" entry
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    meta = {"format": "freeanchor", "format_version": "1", "extra": "{}",
            "config": json.dumps(to_dict(small_model.cfg))}  # fmt: skip
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    _assert_same_model(small_model, load_model(tmp_path / "old.safetensors"), small_input)


def test_engine_checkpoint_checksum_and_ema_weights(small_model, small_input, tmp_path):
    from freeanchor.engine.checkpoint import with_checksum

    cfg = to_dict(Config(model=small_model.cfg))
    torch.manual_seed(5)
    other = FreeAnchor(small_model.cfg).eval()
    state = with_checksum({"model": other.state_dict(), "optimizer": {}, "epoch": 1,
                           "config": cfg, "ema": {"model": small_model.state_dict()}})  # fmt: skip
    path = tmp_path / "last.pt"
    torch.save(state, path)
    _assert_same_model(small_model, load_model(path), small_input)  # the EMA's weights
    _flip_in_payload(path, other.state_dict()["fpn.fpn_convs.0.weight"])
    with pytest.raises(CheckpointError, match="last.pt: checksum mismatch"):
        load_model(path)


def test_engine_checkpoint_with_a_non_mapping_extra(small_model, tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": small_model.state_dict(), "config": to_dict(small_model.cfg),
                "extra": [1, 2]}, path)  # fmt: skip
    with pytest.raises(CheckpointError, match="last.pt: 'extra' is a list, expected a mapping"):
        load_model(path)
    assert main(["convert", str(path), str(tmp_path / "x.safetensors")]) == 2


def test_safetensors_header_with_a_non_mapping_extra(small_model, tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    meta = {"format": "freeanchor", "format_version": "1", "extra": "[1, 2]",
            "config": json.dumps(to_dict(small_model.cfg))}  # fmt: skip
    save_file(state, str(tmp_path / "m.safetensors"), metadata=meta)
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "extra metadata in the header is not a JSON object" in err[0]
