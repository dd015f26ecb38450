"""The real-checkpoint OSDFace loader on a tiny SD-like model with random weights, written in the
layouts OSDFace ships (diffusers folders, LoRA safetensors, torch .pth/.ckpt): LoRA merging against
an unmerged forward, the embedder's token selection against OSDFace's loop, every calibration
method and the exporter (reference and ort-cpu profiles, run by ONNX Runtime) on diffusers' blocks,
and clear one-sentence errors. Checkpoints, recipes and exports are shared per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers", reason="the osdface model needs diffusers: pip install '.[osdface]' or '.[test]'")

from quantface.calibration import METHODS, CalibConfig, calibrate  # noqa: E402
from quantface.calibration.recipe import apply_recipe  # noqa: E402
from quantface.cli import main  # noqa: E402
from quantface.data import write_image  # noqa: E402
from quantface.errors import ConfigError, WeightsError  # noqa: E402
from quantface.metrics import output_psnr  # noqa: E402
from quantface.models import load_model  # noqa: E402
from quantface.models.osdface import (EmbedderConfig, OSDFaceRestorer, load_osdface, merge_lora,  # noqa: E402
                                      osdface_weights)
from quantface.models.osdface_synthetic import LORA_FORMATS, lora_tensors, write_checkpoints  # noqa: E402
from tests.conftest import smooth_image  # noqa: E402

SIZE = 32
# SD 2.1-base's structure, shrunk: cross-attention (linear projections) down/mid/up blocks, a plain
# down and up block, one down/up-sampling; VAE with one down/up-sampling and a mid-block attention.
UNET = dict(sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
           sample_size=SIZE)
EMBEDDER = EmbedderConfig(resolution=SIZE, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=8,
                          n_embed=128, embed_dim=8, proj_hidden=4, context_dim=16)
OPTIONS = dict(working_size=SIZE, embedder_resolution=SIZE)
FP_PROMPT = ("embedder.*", "prompt_proj.*")


class _Cache:
    def __init__(self, root: Path):
        self.root = root
        self.sd, self.ckpt = write_checkpoints(root, UNET, VAE, EMBEDDER, seed=0, lora_rank=2)
        self.weights = osdface_weights(self.sd, self.ckpt, **OPTIONS)
        rng = np.random.default_rng(0)
        for i in range(2):
            write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, SIZE))
        self.recipes: dict[str, object] = {}

    def calibrate(self, method: str, bits: str = "W4A4", **kw):
        key = f"{method}_{bits}"
        if key not in self.recipes:
            cfg = CalibConfig(method=method, bits=bits, data=str(self.root / "faces"), model="osdface",
                              weights=self.weights, out=str(self.root / "recipes" / key), size=SIZE, stat_images=2,
                              rank=2, batch_size=2, steps=1, **kw)
            self.recipes[key] = calibrate(cfg)
        return self.recipes[key]

    def export_recipe(self):
        """QuantFace W4A8 with the visual prompt path in FP: what the export tests compare (why: docs/osdface.md)."""
        return self.calibrate("quantface", "W4A8", fp_layers=FP_PROMPT)

    def ckpt_copy(self, name: str) -> Path:
        """A copy of the OSDFace folder to modify."""
        target = self.root / name
        shutil.copytree(self.ckpt, target)
        return target


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("osdface"))


def _input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------- loading
def test_model_has_the_osdface_interface_and_one_step_formula(cache):
    model = load_model("osdface", cache.weights)
    assert isinstance(model, OSDFaceRestorer) and not model.training
    c = model.config
    assert (c.working_size, c.size_multiple, c.timestep, c.image_channels) == (SIZE, 4, 399, 3)
    assert c.embedder == EMBEDDER  # the architecture read back from the checkpoint's shapes
    # ᾱ399 as diffusers' schedulers compute it: scaled-linear betas in float32, cumulative product.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert c.alpha_bar == float(torch.cumprod(1 - betas, 0)[399])
    x = _input()
    with torch.no_grad():
        y = model(x)
        tokens = model.prompt(x)
        z = model.vae.encoder(x)
        z = model.vae.quant_conv(z)[:, :4] * model.vae.config.scaling_factor
        eps = model.unet(z, 399, encoder_hidden_states=tokens).sample
        x0 = (z - (1 - c.alpha_bar) ** 0.5 * eps) / c.alpha_bar**0.5
        expected = model.vae.decode(x0 / model.vae.config.scaling_factor).sample
    assert y.shape == x.shape and tokens.shape == (2, 77, 16)
    assert torch.allclose(y, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="not divisible by 4"):
        model(torch.zeros(1, 3, 34, 34))


@pytest.mark.parametrize("channels, flip, shift, scale", [(320, True, 0, 1), (16, True, 0, 1), (15, False, 1, 2)])
def test_timestep_frequencies_as_a_buffer_are_diffusers_values(channels, flip, shift, scale):
    """The restorer's time projection (frequencies a torch-built buffer, so every exporter writes the
    same constant) computes diffusers' ``Timesteps`` bit for bit; the loaded model uses it."""
    from diffusers.models.embeddings import Timesteps

    from quantface.models.timesteps import DiffusersTimesteps

    theirs = Timesteps(channels, flip, shift, scale)
    ours = DiffusersTimesteps.replacing(theirs)
    assert isinstance(ours, DiffusersTimesteps)
    t = torch.tensor([399, 0, 999, 1])
    assert torch.equal(ours(t), theirs(t))
    assert DiffusersTimesteps.replacing(torch.nn.Identity()).__class__ is torch.nn.Identity


def test_loaded_model_uses_buffer_timesteps(cache):
    from quantface.models.timesteps import DiffusersTimesteps

    assert isinstance(load_model("osdface", cache.weights).unet.time_proj, DiffusersTimesteps)


def _osdface_tokens(h: torch.Tensor, codebook: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """OSDFace's ``VectorQuantizer.inference`` token selection, as its loop does it, one image at a time."""
    out = []
    for z in h.flatten(2).transpose(1, 2):  # (hw, c)
        d = (z**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.t()
        dist, idx = d.min(1)
        seen: list[int] = []
        for i in idx[torch.sort(dist, stable=True).indices].tolist():
            if i not in seen:
                seen.append(i)
            if len(seen) == n_tokens:
                break
        tokens = torch.zeros(n_tokens, codebook.shape[1])
        tokens[: len(seen)] = codebook[seen]
        out.append(tokens)
    return torch.stack(out)


def test_embedder_tokens_follow_osdface_selection(cache):
    embedder = load_osdface(cache.weights).embedder
    x = _input(3)
    with torch.no_grad():
        h = embedder.quant_conv(embedder.encoder((x - 0.5) / 0.5))
        expected = _osdface_tokens(h, embedder.quantize.embedding.weight, 77)
        assert torch.equal(embedder(x), expected)
        # Fewer distinct codes than tokens: the remaining rows are zero, as in OSDFace.
        assert 0 < int((expected.abs().sum(-1) > 0).sum(1).min()) < 77


def _lora_forward_hooks(unet: nn.Module, tensors: dict[str, torch.Tensor], fmt: str, scale: float) -> None:
    """Unmerged LoRA: y = layer(x) + scale·up(down(x)) on every targeted layer (forward hooks)."""
    down_key, up_key = {"peft": ("lora_A.weight", "lora_B.weight"), "diffusers": ("lora.down.weight", "lora.up.weight"),
                        "kohya": ("lora_down.weight", "lora_up.weight")}[fmt]
    for name, m in unet.named_modules():
        key = f"lora_unet_{name.replace('.', '_')}" if fmt == "kohya" else f"unet.{name}"
        if f"{key}.{down_key}" not in tensors:
            continue
        down, up = tensors[f"{key}.{down_key}"], tensors[f"{key}.{up_key}"]

        def hook(mod, args, out, down=down, up=up):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                return out + scale * F.conv2d(F.conv2d(x, down, None, mod.stride, mod.padding, mod.dilation), up)
            return out + scale * F.linear(F.linear(x, down), up)
        m.register_forward_hook(hook)


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_lora_merge_matches_the_unmerged_forward(cache, fmt):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(cache.sd), subfolder="unet").eval()
    rank, alpha = 2, 3.0  # scale alpha/rank = 1.5, from per-layer alpha tensors or the file's metadata
    tensors = lora_tensors(base, rank, seed=7, fmt=fmt, alpha=None if fmt == "peft" else alpha)
    ckpt = cache.ckpt_copy(f"lora_{fmt}")
    from safetensors.torch import save_file

    metadata = None
    if fmt == "peft":  # PEFT files carry no alpha tensors: diffusers writes the config into the header
        metadata = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha})}
    save_file(tensors, str(ckpt / "pytorch_lora_weights.safetensors"), metadata=metadata)
    merged = load_osdface(osdface_weights(cache.sd, ckpt, **OPTIONS))
    assert merged.config.lora_layers == len(tensors) // (2 if fmt == "peft" else 3) > 20
    _lora_forward_hooks(base, tensors, fmt, alpha / rank)
    g = torch.Generator().manual_seed(3)
    z, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    with torch.no_grad():
        want = base(z, 399, encoder_hidden_states=ctx).sample
        got = merged.unet(z, 399, encoder_hidden_states=ctx).sample
        plain = UNet2DConditionModel.from_pretrained(str(cache.sd), subfolder="unet")
        plain = plain(z, 399, encoder_hidden_states=ctx).sample
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (plain - want).abs().max() > 1e-2 * want.abs().max()  # the LoRA does change the UNet


def test_lora_alpha_override_and_default_scale(cache):
    """Without any alpha in the file the scale is 1 (OSDFace's lora_alpha = lora_rank); the spec's
    lora_alpha overrides the file."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(cache.sd), subfolder="unet")
    w0 = unet.conv_in.weight.detach().clone()
    down, up = torch.randn(2, 4, 3, 3), torch.randn(16, 2, 1, 1)
    tensors = {"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": up}
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    assert merge_lora(unet, tensors, Path("x.safetensors")) == 1
    assert torch.allclose(unet.conv_in.weight, w0 + delta, atol=1e-5)
    merge_lora(unet, tensors, Path("x.safetensors"), alpha=1.0)  # scale 1/2 on top
    assert torch.allclose(unet.conv_in.weight, w0 + 1.5 * delta, atol=1e-5)
    # diffusers' attention-processor layout: <attn>.processor.to_out_lora.* is the layer to_out.0.
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    out0 = unet.get_submodule(f"{attn}.to_out.0").weight
    o0, d, u = out0.detach().clone(), torch.randn(2, out0.shape[1]), torch.randn(out0.shape[0], 2)
    merge_lora(unet, {f"{attn}.processor.to_out_lora.down.weight": d, f"{attn}.processor.to_out_lora.up.weight": u,
                      f"{attn}.processor.to_out_lora.alpha": torch.tensor(1.0)}, Path("x.safetensors"))
    assert torch.allclose(out0, o0 + 0.5 * u @ d, atol=1e-5)
    with pytest.raises(WeightsError, match="names no layer of the UNet"):
        merge_lora(unet, {"unet.nope.lora_A.weight": down, "unet.nope.lora_B.weight": up}, Path("x.safetensors"))
    with pytest.raises(WeightsError, match="not in a LoRA layout"):
        merge_lora(unet, {"unet.conv_in.weight": w0}, Path("x.safetensors"))
    with pytest.raises(WeightsError, match="do not fit its weight"):
        merge_lora(unet, {"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": torch.randn(8, 2, 1, 1)},
                   Path("x.safetensors"))


# ----------------------------------------------------------------------------------------- errors
class _NotATensor:
    pass


def test_checkpoint_needing_code_is_refused(cache):
    ckpt = cache.ckpt_copy("pickled")
    state = torch.load(ckpt / "associate_2.ckpt", weights_only=True)
    torch.save({**state, "hyper_parameters": _NotATensor()}, ckpt / "associate_2.ckpt")
    with pytest.raises(WeightsError) as info:
        load_osdface(osdface_weights(cache.sd, ckpt, **OPTIONS))
    message = str(info.value)
    assert "associate_2.ckpt" in message and "refused" in message and "\n" not in message


def test_truncated_and_mismatched_checkpoints(cache):
    ckpt = cache.ckpt_copy("broken")
    blob = (ckpt / "pytorch_lora_weights.safetensors").read_bytes()
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError, match="pytorch_lora_weights.safetensors is unreadable or truncated"):
        load_osdface(osdface_weights(cache.sd, ckpt, **OPTIONS))
    shutil.copy(cache.ckpt / "pytorch_lora_weights.safetensors", ckpt)
    torch.save({"conv1.weight": torch.zeros(4, 8, 1), "conv1.bias": torch.zeros(4),
                "conv2.weight": torch.zeros(32, 4, 1), "conv2.bias": torch.zeros(32)},
               ckpt / "embedding_change_weights.pth")
    with pytest.raises(WeightsError, match="gives 32-wide tokens but the UNet's cross-attention takes 16"):
        load_osdface(osdface_weights(cache.sd, ckpt, **OPTIONS))


def test_missing_folders_and_files(cache, tmp_path):
    with pytest.raises(WeightsError, match="Stable Diffusion folder .*nowhere does not exist"):
        load_osdface(osdface_weights(tmp_path / "nowhere", cache.ckpt))
    with pytest.raises(WeightsError, match="OSDFace checkpoint folder .*nowhere does not exist"):
        load_osdface(osdface_weights(cache.sd, tmp_path / "nowhere"))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsError, match="has no vae/ subfolder"):
        load_osdface(osdface_weights(tmp_path / "sd", cache.ckpt))
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(WeightsError, match="OSDFace LoRA weights not found in .*pytorch_lora_weights.safetensors"):
        load_osdface(osdface_weights(cache.sd, empty))
    with pytest.raises(ConfigError, match="needs both --sd-path and --osdface-ckpt"):
        load_model("osdface")


def test_missing_diffusers_is_one_clear_error(cache, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # import diffusers → ImportError
    with pytest.raises(WeightsError, match=r"needs the diffusers package: pip install -e '\.\[osdface\]'"):
        load_osdface(cache.weights)


def test_embedder_checkpoint_without_encoder(cache):
    ckpt = cache.ckpt_copy("no_encoder")
    torch.save({"state_dict": {"vqvae_HQ.quant_conv.weight": torch.zeros(2, 2, 1, 1)}}, ckpt / "associate_2.ckpt")
    with pytest.raises(WeightsError, match="associate_2.ckpt holds no VQ encoder tensors"):
        load_osdface(osdface_weights(cache.sd, ckpt, **OPTIONS))


@pytest.mark.parametrize("argv, message", [
    (["restore", "--model", "osdface", "--sd-path", "/no/sd", "--osdface-ckpt", "/no/ckpt", "--input", ".",
      "--output", "o"], "Stable Diffusion folder /no/sd does not exist"),
    (["restore", "--model", "osdface", "--sd-path", "/no/sd", "--input", ".", "--output", "o"],
     "--model osdface needs both --sd-path and --osdface-ckpt"),
    (["export", "--fp32", "--sd-path", "/no/sd", "--out", "m.onnx"],
     "--sd-path and --osdface-ckpt only apply to --model osdface"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "face.png", np.full((32, 32, 3), 128, np.uint8))  # a valid --input: the model is at fault
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


# ------------------------------------------------------------------------------- calibration, export
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"quantface"}))
def test_every_method_calibrates_the_diffusers_model(cache, method):
    # The VAE stays FP here to keep the test short; the quantface recipe below quantizes it.
    result = cache.calibrate(method, fp_layers=("vae.*",))
    layers = json.loads((result.recipe / "recipe.json").read_text())["layers"]
    assert any(n.startswith("unet.time_embedding.") for n in layers)
    assert any(".attn2.to_k" in n for n in layers) and any(n.startswith("embedder.") for n in layers)
    with torch.no_grad():
        y = result.model(_input(1))
    assert y.shape == (1, 3, SIZE, SIZE) and torch.isfinite(y).all()


def test_quantface_recipe_reproduces_on_a_fresh_load(cache):
    result = cache.export_recipe()
    layers = json.loads((result.recipe / "recipe.json").read_text())["layers"]
    fp = load_osdface(cache.weights)
    kinds = {type(m).__name__ for m in fp.modules()}
    assert {"Attention", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"} <= kinds
    wanted = {n for n, m in fp.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith(("embedder.", "prompt_proj."))}
    assert set(layers) == wanted
    assert all(e["weight_bits"] == 4 and e["act_bits"] == 8 and e["lowrank_rank"] for e in layers.values())
    # Every layer is rotated but the VAE encoder's RGB input (3 channels < CalibConfig.rotate_min_channels).
    assert {n for n, e in layers.items() if not e["hadamard"]} == {"vae.encoder.conv_in"}
    reloaded = apply_recipe(load_osdface(cache.weights), result.recipe)
    x = _input(1)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


@pytest.mark.parametrize("profile", ["reference", "ort-cpu"])
def test_export_runs_in_onnxruntime_close_to_the_fake_quant_model(cache, profile):
    from quantface.export import ExportConfig, OnnxBackend, export_onnx

    result = cache.export_recipe()
    out = cache.root / "onnx" / f"{profile}.onnx"
    exported = export_onnx(ExportConfig(model="osdface", weights=cache.weights, recipe=str(result.recipe),
                                        profile=profile, out=str(out)))
    # The fixed-timestep path (time embedding MLP, every ResNet's time_emb_proj) became constants;
    # every other quantized layer is a QDQ subgraph.
    assert "unet.time_embedding.linear_1" in exported.constant_layers
    assert all("time_emb" in n for n in exported.constant_layers)
    n_live = len(json.loads((result.recipe / "recipe.json").read_text())["layers"]) - len(exported.constant_layers)
    import onnx

    from quantface.export.save import read_metadata

    # ort-cpu: one more Q per requantized conv output (every quantized conv here), simulated in PyTorch too.
    requantized = json.loads(read_metadata(onnx.load(str(out)))["requantized_layers"])
    assert bool(requantized) == (profile == "ort-cpu")
    assert exported.node_counts["QuantizeLinear"] == n_live + len(requantized)
    x = _input(2)
    with torch.no_grad():
        want = (apply_recipe(load_osdface(cache.weights), result.recipe, requant_outputs=True)(x).numpy()
                if requantized else result.model(x).numpy())
        fp = load_osdface(cache.weights)(x).numpy()
    got = OnnxBackend(out)(x.numpy())
    # ONNX Runtime's float rounding differs from PyTorch's by ~1e-7, enough to flip a few
    # activation codes, and flips cascade through a random network: ONNX Runtime must stay far
    # closer to the fake-quant model than the fake-quant model is to FP (measured: 15-24 dB closer).
    assert got.shape == want.shape and np.isfinite(got).all()
    assert output_psnr(got, want) >= output_psnr(want, fp) + 10
