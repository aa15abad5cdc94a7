"""Each foundation-model preset held to its official model, built here independently as its card builds it.

The architecture is made the way the model card (or TRIDENT's loader, where the card defers to it)
shows it, with random weights, and written in the published file format and name. That file goes
through ``ipspath features --encoder PRESET --pretrained FILE`` on tiles of a generated slide; the
cached embeddings must be those the official model gives on the card's transform of the same tiles.
Keys and shapes of the billion-weight presets are compared on the meta device (no weights held);
their forward passes are slow tests, one preset per process (``make test-foundation-slow``).

Run where timm and transformers import (``make test-foundation``); skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from ips_path.cli.main import cli
from ips_path.model.foundation import ENCODER_PRESETS, build_preset
from ips_path.runtime import parallel
from ips_path.runtime.errors import BadInputError
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide

timm = pytest.importorskip("timm", reason="needs timm (make test-foundation)", exc_type=ImportError)
transforms = pytest.importorskip("torchvision.transforms")

BICUBIC = transforms.InterpolationMode.BICUBIC
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
RESULTS = os.environ.get("IPSPATH_FOUNDATION_RESULTS")  # a JSON-lines file the max differences are added to


def _swiglu() -> dict:
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _card_transform(*steps, norm=IMAGENET):
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(*norm)])


def _cls_mean(prefix: int):
    def embed(model, x):
        out = model(x)
        return torch.cat([out[:, 0], out[:, prefix:].mean(1)], dim=-1)
    return embed


# The cards' constructions, written out as each card (or TRIDENT's loader) gives them.
CARDS = {
    "uni_v1": dict(model="vit_large_patch16_224", file="pytorch_model.bin", tile=256,
                   kwargs=lambda: dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                       dynamic_img_size=True),
                   transform=lambda: _card_transform(transforms.Resize(224), transforms.CenterCrop(224))),
    "uni2_h": dict(model="vit_giant_patch14_224", file="pytorch_model.bin", tile=224,
                   kwargs=lambda: dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                       embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                       reg_tokens=8, dynamic_img_size=True, **_swiglu()),
                   transform=lambda: _card_transform(transforms.Resize(224), transforms.CenterCrop(224))),
    "virchow": dict(model="vit_huge_patch14_224", file="pytorch_model.bin", tile=256, embed=_cls_mean(1),
                    kwargs=lambda: dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                        global_pool="", dynamic_img_size=True, **_swiglu()),
                    transform=lambda: _card_transform(transforms.Resize(224, interpolation=BICUBIC))),
    "virchow2": dict(model="vit_huge_patch14_224", file="pytorch_model.bin", tile=256, embed=_cls_mean(5),
                     kwargs=lambda: dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                         mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **_swiglu()),
                     transform=lambda: _card_transform(transforms.Resize(224, interpolation=BICUBIC))),
    "h_optimus_0": dict(model="vit_giant_patch14_reg4_dinov2", file="pytorch_model.bin", tile=224,
                        kwargs=lambda: dict(img_size=224, global_pool="token", init_values=1e-5, num_classes=0,
                                            dynamic_img_size=False),
                        transform=lambda: _card_transform(norm=H_OPTIMUS)),
    "h_optimus_1": dict(model="vit_giant_patch14_reg4_dinov2", file="pytorch_model.bin", tile=224,
                        kwargs=lambda: dict(img_size=224, global_pool="token", init_values=1e-5, num_classes=0,
                                            dynamic_img_size=False),
                        transform=lambda: _card_transform(norm=H_OPTIMUS)),
    "gigapath": dict(model="vit_giant_patch14_dinov2", file="pytorch_model.bin", tile=256,
                     kwargs=lambda: dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                         num_heads=24, init_values=1e-05, mlp_ratio=5.33334, num_classes=0),
                     transform=lambda: _card_transform(transforms.Resize(256, interpolation=BICUBIC),
                                                       transforms.CenterCrop(224))),
    "kaiko_vitl14": dict(model="vit_large_patch14_reg4_dinov2", file="model.safetensors", tile=224,
                         kwargs=lambda: dict(img_size=224, dynamic_img_size=True, num_classes=0),
                         transform=lambda: _card_transform(transforms.Resize(224), transforms.CenterCrop(224),
                                                           norm=((0.5,) * 3, (0.5,) * 3))),
}
GIANT = {"uni2_h", "virchow", "virchow2", "h_optimus_0", "h_optimus_1", "gigapath"}


def _random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-device model with seeded random weights (norms near 1), quickly."""
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            if name.endswith("weight") and any(s in name for s in ("norm", "ln_")):
                p.add_(1)
    return model.eval()


def _official_timm(name: str, device: str = "cpu") -> torch.nn.Module:
    card = CARDS[name]
    with torch.device("meta"):
        model = timm.create_model(card["model"], pretrained=False, **card["kwargs"]())
    return model if device == "meta" else _random_weights(model)


def _save(state: dict, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def _tiles(tmp_path: Path, tile: int, n: int = 1, mpp: float = 0.5) -> TileStore:
    """A generated slide and a tile store of ``n`` tiles of ``tile`` px at ``mpp`` µm/px (level 0)."""
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, tile * n, tile, mpp=mpp, downsamples=(1,), seed=4, tissue=3)
    coords = np.stack([np.arange(n) * tile, np.zeros(n, int)], -1)
    return write_tile_store(tmp_path / "tiles" / "s.zarr", coords, np.ones(n, np.float32), np.ones((4, 4), np.uint8),
                            8.0, {"slide_path": str(slide), "level0_mpp": [mpp, mpp], "target_mpp": mpp,
                                  "patch_size": tile, "patch_size_level0": tile, "stride_level0": tile,
                                  "read_level": 0, "read_size": tile})


def _store_patches(store: TileStore) -> torch.Tensor:
    """The uint8 tiles ``ipspath features`` reads, ``(n, 3, H, W)``."""
    return torch.cat([c.patches for c in PatchStreamer(chunk_size=8, device="cpu").stream(store)])


def _card_input(transform, patches: torch.Tensor) -> torch.Tensor:
    """The card's transform applied to each tile as the PIL image it takes."""
    return torch.stack([transform(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in patches])


def _features_cli(store: TileStore, name: str, weights: Path, caplog=None, as_name: str | None = None) -> np.ndarray:
    """``ipspath features --encoder name --pretrained weights`` on ``store``, stored under ``as_name`` (default
    the encoder's name); returns them as float32."""
    parallel._PROCESS_OBJECTS.pop("encoder", None)  # each test loads its own file
    result = CliRunner().invoke(cli, ["features", str(store.path.parent), "--encoder", name, "--pretrained",
                                      str(weights), "--device", "cpu", "--chunk-size", "8",
                                      *(["--name", as_name] if as_name else [])], standalone_mode=False)
    assert result.exception is None, result.output
    parallel._PROCESS_OBJECTS.pop("encoder", None)
    return TileStore.open(store.path).read_array(f"features/{as_name or name}").astype(np.float32)


def _record(name: str, **values: float) -> None:
    print(name, values)
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"preset": name, **values}) + "\n")


def _hold_to_official(name: str, tmp_path: Path, official: torch.nn.Module, embed, transform, weights: Path,
                      tile: int, caplog=None) -> None:
    """The CLI's cached embeddings vs the official model on the card's input of the same tiles."""
    store = _tiles(tmp_path, tile)
    patches = _store_patches(store)
    with torch.no_grad():
        card_in = _card_input(transform, patches)
        expected_card = embed(official, card_in)
    cached = _features_cli(store, name, weights, caplog)
    encoder = build_preset(name, weights).eval()
    with torch.no_grad():
        ours_in = encoder.preprocess(patches)
        ours = encoder(patches)
        expected_same_input = embed(official, ours_in)
    input_diff = (ours_in - card_in).abs()
    model_diff = (ours - expected_same_input).abs().max().item()
    card_diff = (ours - expected_card).abs().max().item()
    _record(name, model_max_abs_diff=model_diff, input_max_abs_diff=input_diff.max().item(),
            input_mean_abs_diff=input_diff.mean().item(), card_pipeline_max_abs_diff=card_diff,
            embedding_max_abs=expected_card.abs().max().item())
    assert ours.shape == (len(patches), ENCODER_PRESETS[name].out_dim)
    # the card's PIL pipeline rounds to 8 bits; ours resizes in float: within about one grey level
    assert input_diff.max() < 0.05 and input_diff.mean() < 0.005, (input_diff.max(), input_diff.mean())
    torch.testing.assert_close(ours, expected_same_input, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, expected_card, rtol=2e-2, atol=2e-2 * expected_card.abs().max().item())
    np.testing.assert_allclose(cached, ours.numpy(), rtol=2e-3, atol=2e-3 * float(ours.abs().max()))


# -- timm presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CARDS))
def test_preset_keys_and_shapes_are_the_cards(name):
    official = _official_timm(name, device="meta").state_dict()
    with torch.device("meta"):
        ours = build_preset(name).backbone.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def _timm_case(name: str, tmp_path: Path, caplog=None) -> None:
    card = CARDS[name]
    official = _official_timm(name)
    weights = _save(official.state_dict(), tmp_path / card["file"])
    _hold_to_official(name, tmp_path, official, card.get("embed", lambda m, x: m(x)), card["transform"](), weights,
                      card["tile"], caplog)


def test_uni_v1_file_gives_the_official_embedding_and_says_when_tiles_differ(tmp_path, caplog):
    caplog.set_level("WARNING")
    _timm_case("uni_v1", tmp_path, caplog)  # 256 px tiles: resized to 224 as the card's transform does
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note: uni_v1")]
    assert len(notes) == 1 and "--mpp 0.5 --patch-size 224" in notes[0] and "0.57 µm/px" in notes[0], notes


def test_kaiko_vitl14_safetensors_gives_the_official_embedding(tmp_path):
    _timm_case("kaiko_vitl14", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GIANT))
def test_giant_preset_file_gives_the_official_embedding(name, tmp_path):
    _timm_case(name, tmp_path)


def test_another_presets_file_names_both_architectures(tmp_path):
    official = _official_timm("uni_v1")
    weights = _save(official.state_dict(), tmp_path / "pytorch_model.bin")
    del official
    with pytest.raises(BadInputError) as info:
        with torch.device("meta"):
            build_preset("uni2_h", weights)
    message = str(info.value)
    assert "the model is a ViT of depth 24, width 1536, 8 register tokens, patch 14 px" in message
    assert "the file holds a ViT of depth 24, width 1024, 0 register tokens, patch 16 px" in message
    assert "stages" not in message


# -- CONCH v1.5 -----------------------------------------------------------------------------------

class _CardConch(torch.nn.Module):
    """CONCH v1.5's image tower as its card's loader builds it: a ViT-L/16 trunk built at 224 px whose
    forward resamples the position embedding DINO's way, then CoCa's attentional pooler and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1.0)
        self.attn_pool_contrast = torch.nn.Module()
        pool = self.attn_pool_contrast
        pool.query = torch.nn.Parameter(torch.randn(1, 768))
        pool.ln_k, pool.ln_q = torch.nn.LayerNorm(1024), torch.nn.LayerNorm(768)
        pool.to_q = torch.nn.Linear(768, 768, bias=False)
        pool.to_kv = torch.nn.Linear(1024, 1536, bias=False)
        pool.to_out = torch.nn.Linear(768, 768, bias=False)
        self.ln_contrast = torch.nn.LayerNorm(768)

    def _pos(self, n_patches: int, side: int) -> torch.Tensor:
        pos = self.trunk.pos_embed
        n = pos.shape[1] - 1
        if n_patches == n:
            return pos
        w0 = side // 16 + 0.1
        grid = pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        tokens = t.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([t.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = t.norm(t.blocks(tokens + self._pos(tokens.shape[1] - 1, x.shape[-1])))
        p = self.attn_pool_contrast
        q = p.to_q(p.ln_q(p.query.expand(len(x), 1, -1)))
        k, v = p.to_kv(p.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (z.reshape(len(x), z.shape[1], 8, 96).permute(0, 2, 1, 3) for z in (q, k, v))
        attn = torch.einsum("bhid,bhjd->bhij", q * 96 ** -0.5, k)
        attn = (attn - attn.amax(-1, keepdim=True)).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(len(x), 1, 768)
        return self.ln_contrast(p.to_out(out)[:, 0])


def test_conch_v15_vision_file_gives_the_official_embedding(tmp_path):
    with torch.device("meta"):
        official = _CardConch()
    official = _random_weights(official)
    weights = _save(official.state_dict(), tmp_path / "pytorch_model_vision.bin")
    with torch.device("meta"):
        ours = build_preset("conch_v15").backbone.state_dict()
    assert set(ours) == set(official.state_dict())
    transform = transforms.Compose([transforms.Resize(448), transforms.CenterCrop(448), transforms.ToTensor(),
                                    transforms.Normalize(*IMAGENET)])
    _hold_to_official("conch_v15", tmp_path, official, lambda m, x: m(x), transform, weights, tile=512)


# -- Phikon-v2, with every transformers the extra allows ------------------------------------------

PHIKON_V2_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                        image_size=224, mlp_ratio=4, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True,
                        use_swiglu_ffn=False, drop_path_rate=0.0)
# the names in owkin/phikon-v2's model.safetensors (transformers 4's; transformers 5 names them otherwise)
PUBLISHED_LAYER_KEYS = {"attention.attention.query.weight", "attention.attention.key.bias",
                        "attention.output.dense.weight", "layer_scale1.lambda1", "mlp.fc1.weight", "norm2.bias"}


def test_phikon_v2_loads_its_published_file_and_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        official = transformers.AutoModel.from_config(transformers.Dinov2Config(**PHIKON_V2_CONFIG))
    official = _random_weights(official)
    folder = tmp_path / "phikon-v2"
    official.save_pretrained(folder)
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {f"encoder.layer.0.{k}" for k in PUBLISHED_LAYER_KEYS} <= names  # the published key scheme
    (tmp_path / "state").mkdir()
    in_memory = _save(official.state_dict(), tmp_path / "state" / "model.safetensors")  # this version's names
    transform = _card_transform(transforms.Resize(224), transforms.CenterCrop(224))

    def embed(model, x):
        return model(pixel_values=x).last_hidden_state[:, 0]

    for i, weights in enumerate((folder / "model.safetensors", folder, in_memory)):
        (tmp_path / f"run{i}").mkdir()
        _hold_to_official("phikon_v2", tmp_path / f"run{i}", official, embed, transform, weights, tile=224)
    print("transformers", transformers.__version__)


def test_conch_v15_train_blocks_also_trains_its_pooler_and_norms():
    with torch.device("meta"):
        encoder = build_preset("conch_v15", train_blocks=2)
    trainable = {n.removeprefix("backbone.") for n, p in encoder.named_parameters() if p.requires_grad}
    assert {"attn_pool_contrast.query", "ln_contrast.weight", "trunk.norm.weight"} <= trainable
    assert all(n.startswith(("trunk.blocks.22.", "trunk.blocks.23.", "trunk.norm.", "attn_pool_contrast.",
                             "ln_contrast.")) for n in trainable)


def test_pretrain_starts_from_a_vit_presets_file_and_trains_only_its_last_blocks(tmp_path):
    """`pretrain --encoder uni_v1 --pretrained FILE --train-blocks 1` changes the last block only, and its
    encoder.pt loads in `features` as the preset's own file does."""
    official = _official_timm("uni_v1")
    weights = _save(official.state_dict(), tmp_path / "pytorch_model.bin")
    store = _tiles(tmp_path, 224, n=4)
    run = tmp_path / "enc"
    result = CliRunner().invoke(cli, ["-q", "pretrain", "--tiles", str(store.path.parent), "-o", str(run), "--encoder",
                                      "uni_v1", "--pretrained", str(weights), "--train-blocks", "1", "--method",
                                      "simclr", "--epochs", "1", "--patches-per-epoch", "8", "--batch-size", "4",
                                      "--device", "cpu", "--lr", "1e-3"], standalone_mode=False)
    assert result.exception is None, result.output
    learned = torch.load(run / "encoder.pt", weights_only=True)["state_dict"]
    start = official.state_dict()
    assert learned.keys() == start.keys()
    changed = {k.split(".")[1] if k.startswith("blocks.") else k.split(".")[0]
               for k in start if not torch.equal(learned[k], start[k])}
    assert changed == {str(len(official.blocks) - 1)} or changed == {str(len(official.blocks) - 1), "norm"}, changed
    before = _features_cli(store, "uni_v1", weights)
    after = _features_cli(store, "uni_v1", run / "encoder.pt", as_name="pretrained")
    assert before.shape == after.shape == (4, 1024) and not np.allclose(before, after)
