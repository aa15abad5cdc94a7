"""Encoders: torchvision ResNet state-dict layout, loading local weights, the small CNN, the feature
projector, pixel normalisation, and timm when it is installed."""

from __future__ import annotations

import pytest
import torch

from ips_path.model import PixelNormalizer, build_encoder
from ips_path.runtime.errors import BadInputError

# torchvision.models.resnet18().state_dict(), written out: convolutions and fc as (key, shape),
# BatchNorm layers as (prefix, channels) for their weight, bias, running_mean, running_var, num_batches_tracked.
TORCHVISION_RESNET18 = [
    ("conv1.weight", (64, 3, 7, 7)), ("bn1", 64),
    ("layer1.0.conv1.weight", (64, 64, 3, 3)), ("layer1.0.bn1", 64),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)), ("layer1.0.bn2", 64),
    ("layer1.1.conv1.weight", (64, 64, 3, 3)), ("layer1.1.bn1", 64),
    ("layer1.1.conv2.weight", (64, 64, 3, 3)), ("layer1.1.bn2", 64),
    ("layer2.0.conv1.weight", (128, 64, 3, 3)), ("layer2.0.bn1", 128),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer2.0.bn2", 128),
    ("layer2.0.downsample.0.weight", (128, 64, 1, 1)), ("layer2.0.downsample.1", 128),
    ("layer2.1.conv1.weight", (128, 128, 3, 3)), ("layer2.1.bn1", 128),
    ("layer2.1.conv2.weight", (128, 128, 3, 3)), ("layer2.1.bn2", 128),
    ("layer3.0.conv1.weight", (256, 128, 3, 3)), ("layer3.0.bn1", 256),
    ("layer3.0.conv2.weight", (256, 256, 3, 3)), ("layer3.0.bn2", 256),
    ("layer3.0.downsample.0.weight", (256, 128, 1, 1)), ("layer3.0.downsample.1", 256),
    ("layer3.1.conv1.weight", (256, 256, 3, 3)), ("layer3.1.bn1", 256),
    ("layer3.1.conv2.weight", (256, 256, 3, 3)), ("layer3.1.bn2", 256),
    ("layer4.0.conv1.weight", (512, 256, 3, 3)), ("layer4.0.bn1", 512),
    ("layer4.0.conv2.weight", (512, 512, 3, 3)), ("layer4.0.bn2", 512),
    ("layer4.0.downsample.0.weight", (512, 256, 1, 1)), ("layer4.0.downsample.1", 512),
    ("layer4.1.conv1.weight", (512, 512, 3, 3)), ("layer4.1.bn1", 512),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)), ("layer4.1.bn2", 512),
    ("fc.weight", (1000, 512)), ("fc.bias", (1000,)),
]

# The first bottleneck of torchvision.models.resnet50() and its last convolution.
TORCHVISION_RESNET50_SAMPLE = {
    "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.bn3.weight": (256,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
}


def torchvision_state_dict(layout=TORCHVISION_RESNET18, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if isinstance(shape, int):
            for name in ("weight", "bias", "running_mean"):
                state[f"{key}.{name}"] = torch.randn(shape, generator=g)
            state[f"{key}.running_var"] = torch.rand(shape, generator=g) + 0.5
            state[f"{key}.num_batches_tracked"] = torch.tensor(7)
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_resnet_state_dict_has_torchvision_layout():
    expected = shapes(torchvision_state_dict())
    del expected["fc.weight"], expected["fc.bias"]
    assert shapes(build_encoder("resnet18").state_dict()) == expected
    resnet50 = shapes(build_encoder("resnet50").state_dict())
    assert len(resnet50) == 320 - 2  # torchvision's resnet50 state dict without fc
    assert {k: resnet50[k] for k in TORCHVISION_RESNET50_SAMPLE} == TORCHVISION_RESNET50_SAMPLE
    assert len(build_encoder("resnet34").state_dict()) == 218 - 2
    two = shapes(build_encoder("resnet18", stages=2).state_dict())
    assert two == {k: v for k, v in expected.items() if not k.startswith(("layer3", "layer4"))}


def test_pretrained_torchvision_file_loads_ignoring_fc(tmp_path):
    state = torchvision_state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    encoder = build_encoder("resnet18", pretrained=path)
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    truncated = build_encoder("resnet18", pretrained=path, stages=2)
    torch.testing.assert_close(truncated.state_dict()["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    # Checkpoints that wrap the weights (and DDP's "module." prefix) load as well.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    wrapped = build_encoder("resnet18", pretrained=tmp_path / "ckpt.pt")
    assert torch.equal(wrapped.state_dict()["bn1.running_var"], state["bn1.running_var"])
    encoder.eval()
    out = encoder(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_bad_weight_files_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        build_encoder("resnet18", pretrained=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(BadInputError, match="garbage.pth: not a readable PyTorch state dict"):
        build_encoder("resnet18", pretrained=garbage)
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": object()}, pickled)  # refused by weights_only=True
    with pytest.raises(BadInputError, match="pickled.pth"):
        build_encoder("resnet18", pretrained=pickled)
    state = torchvision_state_dict()
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(BadInputError, match=r"wrong shape: conv1\.weight \(64, 3, 7, 7\) \(model: \(64, 1, 7, 7\)\)"):
        build_encoder("resnet18", pretrained=tmp_path / "r18.pth", in_channels=1)
    with pytest.raises(BadInputError, match="missing: layer1.2"):
        build_encoder("resnet34", pretrained=tmp_path / "r18.pth")
    del state["layer3.1.bn2.running_var"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(BadInputError, match="1 missing: layer3.1.bn2.running_var"):
        build_encoder("resnet18", pretrained=tmp_path / "incomplete.pth")
    with pytest.raises(BadInputError, match="unknown encoder"):
        build_encoder("resnet101")
    with pytest.raises(BadInputError, match="in_features"):
        build_encoder("features")


def test_megapixel_mnist_encoder_and_small_cnn_shapes():
    encoder = build_encoder("resnet18", stages=2, in_channels=1).eval()
    assert encoder.out_dim == 128
    assert encoder(torch.randint(0, 256, (3, 1, 50, 50), dtype=torch.uint8)).shape == (3, 128)
    cnn = build_encoder("smallcnn", widths=(8, 16, 24)).eval()
    assert cnn.out_dim == 24
    assert cnn(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 24)
    with pytest.raises(BadInputError, match=r"\(n, 3, H, W\)"):
        cnn(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_small_cnn_pooling_takes_the_mean_or_the_max_of_the_last_feature_map():
    patches = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8)
    torch.manual_seed(0)
    avg = build_encoder("smallcnn", in_channels=1, widths=(8, 16)).eval()
    torch.manual_seed(0)
    mx = build_encoder("smallcnn", in_channels=1, widths=(8, 16), pool="max").eval()
    with torch.no_grad():
        feature_map = avg.forward_features(patches)
        torch.testing.assert_close(avg(patches), feature_map.mean((2, 3)))
        torch.testing.assert_close(mx(patches), feature_map.amax((2, 3)))
    assert not torch.allclose(avg(patches), mx(patches))
    with pytest.raises(BadInputError, match="pool must be 'avg' or 'max'"):
        build_encoder("smallcnn", pool="median")


def test_pixel_normalisation_uses_buffers_and_accepts_unit_floats():
    norm = PixelNormalizer(3)
    assert dict(norm.state_dict()) == {}  # configuration, not weights
    white = norm(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(white[0, :, 0, 0], expected)
    torch.testing.assert_close(norm(torch.ones(1, 3, 2, 2)), white)
    grey = PixelNormalizer(1, mean=[0.1], std=[0.2])(torch.zeros(1, 1, 1, 1, dtype=torch.uint8))
    torch.testing.assert_close(grey, torch.full((1, 1, 1, 1), -0.5))
    assert PixelNormalizer(1).mean.flatten().tolist() == [0.5]
    with pytest.raises(BadInputError, match="mean/std"):
        PixelNormalizer(3, mean=[0.5])


def test_feature_projector_takes_cached_float16_features():
    projector = build_encoder("features", in_features=24, out_dim=16)
    assert [type(m).__name__ for m in projector.children()] == ["LayerNorm", "Linear", "BatchNorm1d", "ReLU"]
    out = projector.eval()(torch.randn(5, 24).half())
    assert out.shape == (5, 16) and out.dtype == torch.float32 and (out >= 0).all()
    with pytest.raises(BadInputError, match=r"\(n, 24\)"):
        projector(torch.randn(5, 32))


def test_timm_encoder_loads_local_weights(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "timm_resnet18.pth")
    encoder = build_encoder("timm:resnet18", pretrained=tmp_path / "timm_resnet18.pth").eval()
    assert encoder.out_dim == 512
    assert torch.equal(encoder.backbone.conv1.weight, source.conv1.weight)
    assert encoder(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).shape == (2, 512)
    with pytest.raises(BadInputError, match="timm cannot build"):
        build_encoder("timm:no_such_model_xyz")
