"""Foundation-model presets: the registry, resizing and normalisation, weights, and --train-blocks."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from ips_path.cli.main import cli
from ips_path.config import TrainConfig
from ips_path.model import IPSModel, PatchChunk, ResNet, Task, build_encoder, train_step
from ips_path.model.encoder_base import IMAGENET_MEAN, IMAGENET_STD
from ips_path.model.foundation import ENCODER_PRESETS, FoundationEncoder, build_preset
from ips_path.model.presets import native_tiles_note
from ips_path.runtime.errors import BadInputError
from ips_path.stores.features import extract_features
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide
from ips_path.training.checkpoint import build_model

HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_every_preset_states_what_it_needs():
    assert set(ENCODER_PRESETS) == {"uni_v1", "uni2_h", "conch_v15", "virchow", "virchow2", "h_optimus_0",
                                    "h_optimus_1", "gigapath", "kaiko_vitl14", "phikon_v2", "resnet50_trunc"}
    for preset in ENCODER_PRESETS.values():
        assert preset.out_dim > 0 and preset.resize >= preset.input_size
        assert len(preset.mean) == len(preset.std) == 3
        assert isinstance(getattr(torch, preset.dtype), torch.dtype)
        assert preset.weights and preset.card and preset.licence and preset.interpolation in ("bilinear", "bicubic")
    dims = {name: p.out_dim for name, p in ENCODER_PRESETS.items()}
    assert dims == {"uni_v1": 1024, "uni2_h": 1536, "conch_v15": 768, "virchow": 2560, "virchow2": 2560,
                    "h_optimus_0": 1536, "h_optimus_1": 1536, "gigapath": 1536, "kaiko_vitl14": 1024,
                    "phikon_v2": 1024, "resnet50_trunc": 1024}
    assert ENCODER_PRESETS["h_optimus_0"].mean != IMAGENET_MEAN and ENCODER_PRESETS["uni_v1"].mean == IMAGENET_MEAN
    assert ENCODER_PRESETS["virchow2"].pooling == "cls+mean" and ENCODER_PRESETS["virchow2"].prefix_tokens == 5
    assert ENCODER_PRESETS["virchow"].prefix_tokens == 1
    # the cards' pipelines: GigaPath resizes to 256 and crops 224; Virchow and GigaPath resize bicubically
    giga = ENCODER_PRESETS["gigapath"]
    assert (giga.resize, giga.input_size, giga.interpolation, giga.native_patch) == (256, 224, "bicubic", 256)
    assert {n for n, p in ENCODER_PRESETS.items() if p.interpolation == "bicubic"} == {"virchow", "virchow2",
                                                                                      "gigapath"}
    conch = ENCODER_PRESETS["conch_v15"]
    assert (conch.input_size, conch.native_patch, conch.weights) == (448, 512, "pytorch_model_vision.bin")


def test_features_help_lists_the_presets_with_weights_and_native_tiles():
    result = CliRunner().invoke(cli, ["features", "--help"])
    assert result.exit_code == 0, result.output
    for name, preset in ENCODER_PRESETS.items():
        line = re.search(rf"^ *{name} +(\d+)-d +{re.escape(preset.card)}: .*\((gated|open), ([^)]+)\)\n"
                         r" +native ([^;]+);", result.output, re.MULTILINE)
        assert line, name
        assert int(line[1]) == preset.out_dim and line[3] == preset.licence
        assert line[2] == ("gated" if preset.gated else "open") and line[4].startswith(preset.native)
    assert "native 224 px at 0.5 µm/px, ViT patch 14" in result.output  # H-optimus, as its card says
    assert "input 224 px (resize 256 bicubic, crop 224)" in result.output  # GigaPath


def test_the_note_on_tiles_names_the_tile_command_that_matches():
    uni, giga, kaiko = (ENCODER_PRESETS[n] for n in ("uni_v1", "gigapath", "kaiko_vitl14"))
    assert native_tiles_note(uni, 0.5, 224) is None and native_tiles_note(giga, 0.5, 256) is None
    note = native_tiles_note(ENCODER_PRESETS["h_optimus_0"], 0.5, 256)
    assert note == ("note: h_optimus_0 was trained on 224 px at 0.5 µm/px; these tiles are 256 px at 0.5 µm/px "
                    "(the model sees 0.57 µm/px); `ipspath tile ... --mpp 0.5 --patch-size 224` makes matching tiles")
    assert "--mpp 0.5 --patch-size 256" in native_tiles_note(giga, 1.0, 256)
    assert native_tiles_note(kaiko, 2.0, 224) is None  # trained on several resolutions
    assert native_tiles_note(ENCODER_PRESETS["resnet50_trunc"], 2.0, 96) is None


class _Recorder(nn.Module):
    """A backbone that keeps its input and returns tokens (n, 3, 4): CLS = channel means."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.mean(dim=(2, 3))[:, None, :].expand(-1, 3, -1) + torch.arange(3.0)[None, :, None]


@pytest.mark.parametrize("name", ["uni_v1", "h_optimus_0"])
def test_patches_are_resized_and_normalised_as_the_preset_says(name):
    preset = dataclasses.replace(ENCODER_PRESETS[name], out_dim=3)
    encoder = FoundationEncoder(preset, _Recorder())
    patches = torch.full((2, 3, 256, 256), 128, dtype=torch.uint8)
    patches[1] = 200
    out = encoder(patches)
    seen = encoder.backbone.seen
    assert seen.shape == (2, 3, 224, 224)
    expected = (torch.tensor([128.0, 200.0])[:, None] / 255 - torch.tensor(preset.mean)) / torch.tensor(preset.std)
    torch.testing.assert_close(seen.mean(dim=(2, 3)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected)  # the class token
    virchow = FoundationEncoder(dataclasses.replace(ENCODER_PRESETS["virchow2"], prefix_tokens=1, out_dim=6),
                                _Recorder())
    tokens = _Recorder().forward_features(virchow.normalize(patches.float() / 255))
    torch.testing.assert_close(virchow(patches), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


def test_gigapath_crops_the_centre_of_its_256_px_input_and_virchow_resizes_bicubically():
    patches = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    giga = FoundationEncoder(dataclasses.replace(ENCODER_PRESETS["gigapath"], out_dim=3), _Recorder())
    giga(patches)
    torch.testing.assert_close(giga.backbone.seen, giga.normalize(patches[..., 16:240, 16:240]))
    virchow = FoundationEncoder(dataclasses.replace(ENCODER_PRESETS["virchow2"], out_dim=3, pooling="cls"),
                                _Recorder())
    virchow(patches)
    x = F.interpolate(patches.float() / 255, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(virchow.backbone.seen, virchow.normalize(x))
    h_optimus = FoundationEncoder(dataclasses.replace(ENCODER_PRESETS["h_optimus_0"], out_dim=3), _Recorder())
    native = patches[..., :224, :224]
    h_optimus(native)  # its native 224 px tiles go in as they are
    torch.testing.assert_close(h_optimus.backbone.seen, h_optimus.normalize(native))


@pytest.fixture()
def resnet50_weights(tmp_path):
    """A full ResNet-50 file in torchvision's layout (seeded, not ImageNet: the code path is what counts)."""
    torch.manual_seed(3)
    model = ResNet("resnet50")
    state = {**model.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    return path, model


def test_resnet50_trunc_is_imagenet_resnet50_to_layer3_on_224px(resnet50_weights):
    path, full = resnet50_weights
    encoder = build_encoder("resnet50_trunc", pretrained=path).eval()
    assert encoder.out_dim == 1024
    patches = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = encoder(patches)
        x = F.interpolate(patches.float() / 255, size=(224, 224), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        full.eval()
        x = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(x))).mean(dim=(2, 3))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_features_with_resnet50_trunc_end_to_end(resnet50_weights, tmp_path):
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 128, 64, mpp=0.5, downsamples=(1,), seed=2)
    xs, ys = np.arange(0, 128 - 63, 64), np.arange(0, 64 - 63, 64)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    store = write_tile_store(tmp_path / "tiles" / "s.zarr", coords, np.ones(len(coords), np.float32),
                             np.ones((4, 4), np.uint8), 8.0,
                             {"slide_path": str(slide), "level0_mpp": [0.5, 0.5], "target_mpp": 0.5,
                              "patch_size": 64, "patch_size_level0": 64, "stride_level0": 64, "read_level": 0,
                              "read_size": 64})
    result = CliRunner().invoke(cli, ["features", str(store.path.parent), "--encoder", "resnet50_trunc",
                                      "--pretrained", str(resnet50_weights[0]), "--device", "cpu",
                                      "--chunk-size", "8"], standalone_mode=False)
    assert result.exception is None, result.output
    cached = TileStore.open(store.path).read_array("features/resnet50_trunc")
    assert cached.shape == (len(coords), 1024) and np.isfinite(cached).all()


def test_weights_problems_are_one_clear_line(resnet50_weights, tmp_path):
    with pytest.raises(BadInputError, match="needs its weights: give --pretrained"):
        extract_features([tmp_path], "uni_v1", progress=False)
    with pytest.raises(BadInputError, match="not found"):
        build_preset("resnet50_trunc", tmp_path / "missing.pth")
    torch.save(ResNet("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BadInputError, match="do not fit"):
        build_preset("resnet50_trunc", tmp_path / "r18.pth")
    with pytest.raises(BadInputError, match="unknown encoder"):
        build_encoder("uni_v3")


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed here")
def test_a_missing_extra_is_named():
    with pytest.raises(BadInputError, match=r"optional extra 'foundation'.*pip install 'ipspath\[foundation\]'"):
        build_preset("uni_v1")


class _TinyViT(nn.Module):
    """Shaped like a timm ViT: patch_embed, cls_token, blocks, norm; forward_features -> tokens."""

    def __init__(self, dim: int = 16, depth: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.norm(self.blocks(tokens))


def _tiny_encoder() -> FoundationEncoder:
    torch.manual_seed(0)
    preset = dataclasses.replace(ENCODER_PRESETS["uni_v1"], input_size=32, out_dim=16)
    return FoundationEncoder(preset, _TinyViT())


def test_train_blocks_trains_only_the_last_k_blocks_under_checkpointing():
    encoder, reference = _tiny_encoder(), _tiny_encoder()
    encoder.set_train_blocks(2)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.blocks.2.", "backbone.blocks.3.", "backbone.norm."))
                             for n in trainable)
    assert any(n.startswith("backbone.blocks.2.") for n in trainable)
    calls = {i: 0 for i in range(4)}
    for i, block in enumerate(encoder.backbone.blocks):
        block.linear1.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    patches = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    encoder.train()
    out = encoder(patches)
    out.sum().backward()
    # frozen blocks run once; trained blocks run again in the backward pass (their activations were not kept)
    assert calls == {0: 1, 1: 1, 2: 2, 3: 2}
    assert all((p.grad is not None) == p.requires_grad for p in encoder.parameters())
    reference.train()
    torch.testing.assert_close(out, reference(patches))  # same function, only the gradients change
    encoder.set_train_blocks(None)
    assert all(p.requires_grad for p in encoder.parameters())
    with pytest.raises(BadInputError, match="has 4 blocks"):
        encoder.set_train_blocks(5)


def test_an_ips_step_fine_tunes_only_the_last_blocks_with_checkpointed_pieces():
    encoder = _tiny_encoder()
    encoder.set_train_blocks(1)
    model = IPSModel(encoder, [Task("label", 2, "multiclass")], dim=16, n_heads=2, n_select=6, chunk_size=8,
                     grad_chunk_size=4, checkpoint=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    slides = [[PatchChunk(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)) for _ in range(3)]
              for _ in range(2)]
    result = train_step(model, slides, {"label": torch.tensor([0, 1])}, optimizer)
    assert result["n_selected"] == [6, 6] and np.isfinite(result["loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.backbone.blocks.3.") for n in changed)
    frozen = tuple(f"encoder.backbone.{part}" for part in ("blocks.0.", "blocks.1.", "blocks.2.", "patch_embed"))
    assert not any(n.startswith(frozen) for n in changed)
    assert any(n.startswith("aggregator") for n in changed)


def test_train_blocks_needs_a_vit_preset_and_pixels(resnet50_weights):
    with pytest.raises(BadInputError, match="--train-blocks"):
        TrainConfig(train_blocks=-1)
    with pytest.raises(BadInputError, match="--train-blocks"):
        TrainConfig(train_blocks=2, features="uni_v1")
    with pytest.raises(BadInputError, match="needs a ViT preset"):
        build_model(TrainConfig(encoder="resnet18", train_blocks=2), 2)
    with pytest.raises(BadInputError, match="no transformer blocks"):
        build_model(TrainConfig(encoder="resnet50_trunc", train_blocks=2, pretrained=str(resnet50_weights[0])), 2)
    with pytest.raises(BadInputError, match="needs its weights"):
        build_model(TrainConfig(encoder="uni_v1"), 2)
