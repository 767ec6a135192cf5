"""`medgen convert`: published VolDiT, CardioDiT and MedLoRD checkpoints -> medgen_rt.

Each test builds a checkpoint with the published parameter names and shapes
(random values, small sizes), converts it, and compares medgen_rt's output on a
fixed input with an independent computation from the same tensors (fp32,
relative 1e-5 of the largest reference value):

* VQ-GANs: MONAI's own VQVAE holding the tensors (the published VQ-GANs keep its structure);
* DiT3D / DiT4D / TGCA: a plain re-computation here from the published formulas
  (sin-cos positional embeddings, Conv3d / einops patch order, adaLN-Zero blocks,
  softmax attention, final layer, unpatchify), sharing no code with medgen_rt;
* MedLoRD: MONAI's own DiffusionModelUNet and ControlNet (include_fc=False: the
  published attention never applies its output projection), the U-Net loaded
  with MONAI's own load_old_state_dict from the published (MONAI Generative) names.
"""
from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import VQVAE, ControlNet, DiffusionModelUNet

from medgen_rt.convert import ConvertOptions, convert
from medgen_rt.convert.dit import infer_grid
from medgen_rt.convert.medlord import unet_supports_out_silu
from medgen_rt.convert.voldit import tgca_supports_control_norm
from medgen_rt.models import load_model

TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randn(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


# ---- the published fixed embeddings, written out from the published formulas ----------------

def _sincos_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def published_pos_embed(dim, grid):
    """VolDiT get_3d_sincos_pos_embed (dim padded to a multiple of 6) / CardioDiT get_4d_sincos_pos_embed."""
    mesh = np.stack(np.meshgrid(*[np.arange(g, dtype=np.float32) for g in grid], indexing="ij")).reshape(len(grid), -1)
    if len(grid) == 3:
        each = (dim + (6 - dim % 6) % 6) // 3
        emb = np.concatenate([_sincos_1d(each, mesh[a]) for a in range(3)], axis=1)[:, :dim]
    else:
        emb = np.concatenate([_sincos_1d(dim // 4, mesh[a]) for a in range(4)], axis=1)
    return torch.from_numpy(emb).float()


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---- published DiT checkpoints and their forward -----------------------------------------------

def published_dit_state(gen, hidden, depth, channels, patch, grid, conv3d, label_rows=1, prefix=""):
    """A DiT3D (Conv3d patch embedding) or DiT4D (Linear) state_dict with the published names."""
    p = math.prod(patch)
    sd = {}

    def lin(name, out_f, in_f):
        sd[f"{name}.weight"] = randn(gen, out_f, in_f, std=in_f ** -0.5)
        sd[f"{name}.bias"] = randn(gen, out_f, std=0.1)

    if conv3d:
        sd["x_embedder.proj.weight"] = randn(gen, hidden, channels, *patch, std=(channels * p) ** -0.5)
        sd["x_embedder.proj.bias"] = randn(gen, hidden, std=0.1)
    else:
        lin("x_embedder.proj", hidden, channels * p)
    sd["pos_embed"] = published_pos_embed(hidden, grid)[None]
    lin("t_embedder.mlp.0", hidden, 256)
    lin("t_embedder.mlp.2", hidden, hidden)
    if label_rows:
        sd["y_embedder.embedding_table.weight"] = randn(gen, label_rows, hidden)
    for i in range(depth):
        lin(f"blocks.{i}.attn.qkv", 3 * hidden, hidden)
        lin(f"blocks.{i}.attn.proj", hidden, hidden)
        lin(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden)
        lin(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden)
        lin(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden)
    lin("final_layer.linear", p * channels, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return {prefix + k: v for k, v in sd.items()}


def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def ref_dit_forward(sd, x, t, heads, patch, controls=None, control_norm=False):
    """The published DiT3D/DiT4D forward (and TGCA's control injection) from plain torch ops."""
    B, C = x.shape[:2]
    hidden = sd["x_embedder.proj.bias"].shape[0]
    if x.dim() == 5:  # VolDiT: Conv3d with kernel = stride = patch, tokens in (d h w) order
        tokens = F.conv3d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
    else:  # CardioDiT: "b c (z pz) (h ph) (w pw) (t pt) -> b (z h w t) (c pz ph pw pt)"
        grid = [s // q for s, q in zip(x.shape[2:], patch)]
        v = x.reshape(B, C, grid[0], patch[0], grid[1], patch[1], grid[2], patch[2], grid[3], patch[3])
        v = v.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9).reshape(B, math.prod(grid), -1)
        tokens = F.linear(v, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])
    h = tokens + sd["pos_embed"]
    t_emb = F.linear(F.silu(F.linear(timestep_embedding(t, 256), sd["t_embedder.mlp.0.weight"],
                                     sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"],
                     sd["t_embedder.mlp.2.bias"])
    c = t_emb
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = hidden // heads
    for i in range(depth):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        a = _modulate(_layer_norm(h), shift1, scale1)
        if controls is not None and i in controls:
            ctrl = controls[i]
            a = a + (_layer_norm(ctrl) if control_norm else ctrl)
        qkv = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, -1, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, -1, hidden), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + gate1[:, None] * att
        m = _modulate(_layer_norm(h), shift2, scale2)
        m = F.linear(F.gelu(F.linear(m, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"],
                     sd[b + "mlp.fc2.bias"])
        h = h + gate2[:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(_modulate(_layer_norm(h), shift, scale), sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    n = len(patch)
    out = out.reshape(B, *grid, *patch, C)
    order = [0, 1 + 2 * n] + [j for a in range(n) for j in (1 + a, 1 + n + a)]
    return out.permute(order).reshape(B, C, *[g * q for g, q in zip(grid, patch)]), t_emb


# ---- VQ-GANs: MONAI's VQVAE is the published structure ------------------------------------------

def monai_vqvae(gen, embedding_dim=4):
    net = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), num_res_layers=1,
                num_res_channels=(8, 16), downsample_parameters=((2, 4, 1, 1),) * 2,
                upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=32, embedding_dim=embedding_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(randn(gen, *p.shape, std=0.3))
        net.quantizer.quantizer.ema_cluster_size.copy_(torch.rand(32, generator=gen) + 0.5)
        net.quantizer.quantizer.ema_w.copy_(randn(gen, 32, embedding_dim))
    return net.eval()


def vqgan_checkpoint(path, net):
    """VolDiT/CardioDiT trainer layout: model + discriminator + optimizer states."""
    torch.save({"epoch": 3, "best_loss": 0.1, "model": net.state_dict(),
                "discriminator": {"model.0.weight": torch.ones(2)},
                "optimizer_g": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)


def check_same_codes(z, codebook, ours, ref):
    """Equal codebook indices, except where two entries are equally near (float32 rounding decides those)."""
    differ = ours != ref
    if differ.any():
        flat = z.double().movedim(1, -1)[differ]
        book = codebook.double()
        gap = (flat - book[ours[differ]]).norm(dim=-1) - (flat - book[ref[differ]]).norm(dim=-1)
        assert gap.abs().max() < 1e-5 * flat.norm(dim=-1).max(), f"{int(differ.sum())} codes differ"


def check_vqgan(ours, net, x):
    with torch.no_grad():
        z_ref, z = net.encode(x), ours.encode(x)
        assert rel_err(z, z_ref) < TOL
        codebook = net.quantizer.quantizer.embedding.weight
        indices, indices_ref = ours.encode_to_indices(x), net.index_quantize(x)
        check_same_codes(z_ref, codebook, indices, indices_ref)
        assert rel_err(ours.encode_to_latent(x), net.quantizer.embed(indices)) < TOL
        q_ref = net.quantizer.embed(indices_ref)
        assert rel_err(ours.decode(q_ref), net.decode(q_ref)) < TOL
        # a generated latent near the codebook: snapped to it, then decoded (decode_stage_2_outputs)
        noisy = q_ref + 0.05 * torch.randn(q_ref.shape, generator=torch.Generator().manual_seed(5))
        assert rel_err(ours.decode_latent(noisy), net.decode_stage_2_outputs(noisy)) < TOL


# ---- VolDiT ------------------------------------------------------------------------------------

VOLDIT = dict(hidden=64, depth=2, heads=2, channels=4, patch=(2, 2, 2), grid=(2, 3, 2))


@pytest.fixture(scope="module")
def voldit(tmp_path_factory):
    """A published VolDiT VQ-GAN + DiT3D (EMA in the checkpoint), converted through the CLI."""
    from medgen_rt.cli import main

    root = tmp_path_factory.mktemp("voldit")
    gen = torch.Generator().manual_seed(0)
    net = monai_vqvae(gen)
    vqgan_checkpoint(root / "vqgan.pth", net)
    c = VOLDIT
    raw = published_dit_state(gen, c["hidden"], c["depth"], c["channels"], c["patch"], c["grid"], conv3d=True)
    shadow = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in raw.items() if k != "pos_embed"}
    torch.save({"epoch": 9, "model": raw, "ema": {"decay": 0.9999, "shadow": shadow},
                "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": None}, root / "dit.pth")
    out = root / "model"
    assert main(["convert", "voldit", str(root / "dit.pth"), str(root / "vqgan.pth"), "--out", str(out),
                 "--num-heads", "2", "--scale-factor", "1.25"]) == 0
    return {"root": root, "out": out, "net": net, "raw": raw, "ema": {**raw, **shadow}}


def test_voldit_vqgan_matches_monai_vqvae(voldit):
    vae, info = load_model(voldit["out"] / "vae")
    assert info["kind"] == "vqgan" and info["config"]["channels"] == [8, 16] and not info["config"]["cine"]
    check_vqgan(vae.eval(), voldit["net"], torch.randn(1, 1, 16, 24, 16, generator=torch.Generator().manual_seed(1)))


def test_voldit_dit3d_matches_published_forward(voldit):
    dit, info = load_model(voldit["out"] / "dit")
    cfg = info["config"]
    assert tuple(cfg["input_size"]) == (4, 6, 4) and cfg["num_heads"] == 2 and cfg["num_classes"] == 0
    assert info["scale_factor"] == 1.25 and info["latent_shape"] == [4, 4, 6, 4]
    assert info["geometry"]["image_shape"] == [16, 24, 16] and info["modality"] == "ct"
    conv = info["conversion"]
    assert conv["sources"][0]["weights"] == "ema" and "optimizer" in conv["sources"][0]["ignored_entries"]
    assert any(k.endswith("pos_embed") for k in conv["dropped_tensors"])
    x = torch.randn(2, 4, 4, 6, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([17, 250])
    ref, _ = ref_dit_forward(voldit["ema"], x, t, VOLDIT["heads"], VOLDIT["patch"])
    with torch.no_grad():
        assert rel_err(dit.eval()(x, t), ref) < TOL


def test_raw_weights_option(voldit, tmp_path):
    root = voldit["root"]
    result = convert("voldit", [root / "vqgan.pth", root / "dit.pth"], tmp_path / "raw",
                     options=ConvertOptions(raw_weights=True, num_heads=2))
    dit, info = load_model(result["runs"]["dit"])
    assert info["conversion"]["sources"][1]["weights"] == "raw"
    assert torch.equal(dit.state_dict()["blocks.1.attn.qkv.weight"], voldit["raw"]["blocks.1.attn.qkv.weight"])
    x = torch.randn(1, 4, 4, 6, 4, generator=torch.Generator().manual_seed(3))
    ref, _ = ref_dit_forward(voldit["raw"], x, torch.tensor([5]), VOLDIT["heads"], VOLDIT["patch"])
    with torch.no_grad():
        assert rel_err(dit.eval()(x, torch.tensor([5])), ref) < TOL


def _tgca_checkpoint(gen, path, hidden, depth, mask_channels):
    base = published_dit_state(gen, hidden, depth, VOLDIT["channels"], VOLDIT["patch"], VOLDIT["grid"], conv3d=True,
                               prefix="base_model.")
    adapter = {}
    chans = (8, 16, 32, 64, 128)

    def conv(name, c_out, c_in):
        adapter[f"condition_embedder.{name}.conv.weight"] = randn(gen, c_out, c_in, 3, 3, 3, std=(c_in * 27) ** -0.5)
        adapter[f"condition_embedder.{name}.conv.bias"] = randn(gen, c_out, std=0.1)

    conv("conv_in", chans[0], mask_channels)
    for j, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
        conv(f"blocks.{2 * j}", a, a)
        conv(f"blocks.{2 * j + 1}", b, a)
    conv("conv_out", hidden, chans[-1])
    adapter["time_gate.weight"] = randn(gen, 1, hidden, std=hidden ** -0.5)
    adapter["time_gate.bias"] = randn(gen, 1, std=0.1)
    for i in range(depth):
        adapter[f"adapter_scales.{i}"] = torch.full((1,), 0.1 + 0.3 * i)
    shadow = {k: v * 1.1 for k, v in adapter.items()}
    torch.save({"epoch": 4, "model": {**base, **adapter}, "ema": {"decay": 0.999, "shadow": shadow}}, path)
    return {k[len("base_model."):]: v for k, v in base.items()}, shadow


def ref_tgca_forward(base, adapter, x, t, mask, grid, control_norm):
    """Published TGCA3D.forward: mask encoder, trilinear resize to the token grid, time gate, scales."""
    h = F.silu(F.conv3d(mask, adapter["condition_embedder.conv_in.conv.weight"],
                        adapter["condition_embedder.conv_in.conv.bias"], padding=1))
    for j in range(8):
        h = F.silu(F.conv3d(h, adapter[f"condition_embedder.blocks.{j}.conv.weight"],
                            adapter[f"condition_embedder.blocks.{j}.conv.bias"], stride=1 + j % 2, padding=1))
    h = F.conv3d(h, adapter["condition_embedder.conv_out.conv.weight"],
                 adapter["condition_embedder.conv_out.conv.bias"], padding=1)
    if tuple(h.shape[2:]) != tuple(grid):
        h = F.interpolate(h, size=tuple(grid), mode="trilinear", align_corners=False)
    tokens = h.flatten(2).transpose(1, 2)
    _, t_emb = ref_dit_forward(base, x, t, VOLDIT["heads"], VOLDIT["patch"])
    gate = torch.sigmoid(F.linear(t_emb, adapter["time_gate.weight"], adapter["time_gate.bias"]))[:, :, None]
    control = gate * tokens
    controls = {i: adapter[f"adapter_scales.{i}"] * control for i in range(VOLDIT["depth"])}
    return ref_dit_forward(base, x, t, VOLDIT["heads"], VOLDIT["patch"], controls, control_norm)[0]


def test_voldit_tgca_forward_with_mask(voldit, tmp_path):
    gen = torch.Generator().manual_seed(4)
    base, adapter = _tgca_checkpoint(gen, tmp_path / "tgca.pth", VOLDIT["hidden"], VOLDIT["depth"], mask_channels=2)
    ckpts = [voldit["root"] / "vqgan.pth", voldit["root"] / "dit.pth", tmp_path / "tgca.pth"]
    x = torch.randn(2, 4, 4, 6, 4, generator=gen)
    t = torch.tensor([3, 200])
    mask = (torch.rand(2, 2, 16, 24, 16, generator=gen) > 0.5).float()
    published = ref_tgca_forward(base, adapter, x, t, mask, VOLDIT["grid"], control_norm=True)
    if tgca_supports_control_norm():  # medgen_rt can express the published LayerNorm: exact
        result = convert("voldit", ckpts, tmp_path / "exact", options=ConvertOptions(num_heads=2))
        tgca, _ = load_model(result["runs"]["tgca"])
        with torch.no_grad():
            assert rel_err(tgca.eval()(x, t, mask), published) < TOL
        return
    with pytest.raises(ValueError, match="control_norm"):
        convert("voldit", ckpts, tmp_path / "strict", options=ConvertOptions(num_heads=2))
    result = convert("voldit", ckpts, tmp_path / "model", options=ConvertOptions(num_heads=2, allow_deviations=True))
    tgca, info = load_model(result["runs"]["tgca"])
    assert info["mask_labels"] == [1, 2] and info["config"]["inject_layers"] is None
    assert info["conversion"]["deviations"] and info["base"]["kind"] == "dit"
    with torch.no_grad():
        ours = tgca.eval()(x, t, mask)
    # medgen_rt's TGCA is the published one without the control LayerNorm (DESIGN.md section 4)
    assert rel_err(ours, ref_tgca_forward(base, adapter, x, t, mask, VOLDIT["grid"], control_norm=False)) < TOL
    assert rel_err(ours, published) > 1e-3
    # without the DiT checkpoint, the TGCA checkpoint's own base_model copy makes dit/ as well
    alone = convert("voldit", [ckpts[0], ckpts[2]], tmp_path / "alone",
                    options=ConvertOptions(num_heads=2, allow_deviations=True))
    dit, _ = load_model(alone["runs"]["dit"])
    with torch.no_grad():
        assert rel_err(dit.eval()(x, t), ref_dit_forward(base, x, t, VOLDIT["heads"], VOLDIT["patch"])[0]) < TOL


def test_converted_model_samples_with_streamed_decoding(voldit, tmp_path):
    from medgen_rt.cli import main
    from medgen_rt.sampling.api import decode_latent

    vae, _ = load_model(voldit["out"] / "vae")
    latent = torch.randn(1, 4, 4, 6, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = vae.eval().decode(latent)
        streamed = decode_latent(vae, latent, chunk=1, axis=1)  # what medgen sample runs, one plane per step
    assert rel_err(streamed, full) < TOL
    # a memory limit that holds the denoiser but not the whole decode: the decode streams in several steps
    from medgen_rt.sampling.planner import plan_sampling

    dit, _ = load_model(voldit["out"] / "dit")
    plan = plan_sampling(dit, vae, (4, 4, 6, 4))
    decode = plan.costs["decode"]
    limit = int(max(plan.predicted_peak_bytes["denoise"], decode["fixed"] + 2 * decode["per_unit"]) * 1.05) + 4096
    assert decode["fixed"] + 6 * decode["per_unit"] > limit
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(voldit["out"]), "--steps", "2", "--no-energy", "--quiet", "--out", str(out),
                 "--max-vram", str(limit)]) == 0
    side = json.loads((out / "sample_000.json").read_text())
    assert side["plan"]["decode_chunk"] < 6 and side["kind"] == "dit" and side["steps"] == 2
    import nibabel as nib

    vol = nib.load(str(out / "sample_000.nii.gz"))
    assert vol.shape == (16, 24, 16)


# ---- errors --------------------------------------------------------------------------------------

def _dit_variant(voldit, path, edit):
    sd = dict(voldit["raw"])
    edit(sd)
    torch.save({"model": sd}, path)
    return [voldit["root"] / "vqgan.pth", path]


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__("blocks.0.attn.extra_scale", torch.ones(3)),
     r"unknown key.*blocks\.0\.attn\.extra_scale"),
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing key.*blocks\.1\.mlp\.fc2\.bias"),
    (lambda sd: sd.__setitem__("blocks.1.attn.proj.weight", torch.ones(64, 65)),
     r"wrong shape.*blocks\.1\.attn\.proj\.weight: checkpoint \(64, 65\), expected \(64, 64\)"),
])
def test_unknown_missing_and_wrong_shape_keys_are_named(voldit, tmp_path, edit, message):
    ckpts = _dit_variant(voldit, tmp_path / "dit.pth", edit)
    with pytest.raises(ValueError, match=message):
        convert("voldit", ckpts, tmp_path / "out", options=ConvertOptions(num_heads=2))
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_and_never_unpickles(voldit, tmp_path, capsys):
    from medgen_rt.cli import main

    torch.save({"model": voldit["raw"], "args": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pth")
    assert main(["convert", "voldit", str(voldit["root"] / "vqgan.pth"), str(tmp_path / "pickled.pth"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a weights-only checkpoint" in capsys.readouterr().err
    assert main(["convert", "voldit", str(voldit["root"] / "dit.pth"), "--out", str(tmp_path / "out")]) == 2
    assert "VQ-GAN" in capsys.readouterr().err
    assert main(["convert", "voldit", str(voldit["root"] / "vqgan.pth"), str(voldit["root"] / "dit.pth"),
                 "--out", str(voldit["out"])]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_grid_is_read_from_the_published_pos_embed():
    for dim, grid in [(64, (2, 3, 5)), (384, (32, 32, 16)), (66, (4, 1, 7)), (64, (2, 3, 4, 5)), (768, (6, 16, 16, 4))]:
        assert infer_grid(published_pos_embed(dim, grid)[None], len(grid)) == grid


# ---- CardioDiT -----------------------------------------------------------------------------------

def test_cardiodit_vqgan_and_dit4d(tmp_path):
    gen = torch.Generator().manual_seed(10)
    net = monai_vqvae(gen)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "vqgan.safetensors"))
    hidden, depth, heads, patch, grid = 64, 2, 4, (1, 2, 2, 2), (2, 2, 2, 2)
    raw = published_dit_state(gen, hidden, depth, 4, patch, grid, conv3d=False, label_rows=0)
    torch.save({"model": raw, "ema": {"decay": 0.9999, "warmup_steps": 0, "step": 7, "shadow": {}},
                "rng": {"numpy": np.random.get_state()}}, tmp_path / "dit.pth")
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump({
        "model": {"params": {"input_size": [2, 4, 4, 4], "patch_size": list(patch), "in_channels": 4,
                             "hidden_size": hidden, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0,
                             "class_dropout_prob": 0.0, "num_classes": 0, "learn_sigma": False,
                             "flash_attention": True}},
        "scheduler": {"schedule": "cosine", "num_train_timesteps": 300, "prediction_type": "v_prediction"},
        "training": {"scale_factor": 1.7}}))
    result = convert("cardiodit", [tmp_path / "dit.pth", tmp_path / "vqgan.safetensors"], tmp_path / "model",
                     configs=[tmp_path / "dit.yaml"])
    vae, vae_info = load_model(result["runs"]["vae"])
    dit, info = load_model(result["runs"]["dit"])
    assert vae_info["config"]["cine"] and vae_info["modality"] == "cmr" and info["scale_factor"] == 1.7
    assert info["latent_shape"] == [4, 2, 4, 4, 4] and info["geometry"]["image_shape"] == [16, 16, 2, 16]
    assert info["diffusion"]["timesteps"] == 300 and tuple(info["config"]["patch_size"]) == patch

    x = torch.randn(2, 4, 2, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 299])
    ref, _ = ref_dit_forward(raw, x, t, heads, patch)
    with torch.no_grad():
        assert rel_err(dit.eval()(x, t), ref) < TOL
        # the published sampler decodes latent (C, D, H, W, T) slice by slice and stacks to (H, W, D, T)
        latent = torch.randn(1, 4, 2, 4, 4, 4, generator=gen)
        slices = [net.decode_stage_2_outputs(latent[:, :, d])[0] for d in range(2)]
        ref_volume = torch.stack(slices, dim=1)[0].permute(1, 2, 0, 3)
        assert rel_err(vae.eval().decode_latent(latent)[0, 0], ref_volume) < TOL
    check_vqgan(vae, net, torch.randn(1, 1, 16, 16, 8, generator=gen))

    from medgen_rt.cli import main

    out = tmp_path / "samples"
    assert main(["sample", "--model", result["out"], "--steps", "2", "--no-energy", "--quiet", "--out", str(out),
                 "--max-vram", "20MB"]) == 0
    assert json.loads((out / "sample_000.json").read_text())["plan"]["decode_chunk"] >= 1


def asymmetric_vqgan_state(gen):
    """CardioDiT configs/stage1/vqgan_ds4xy_ds2t.yaml at small widths: level 2 strides (2, 2, 1), kernel (4, 4, 1)."""
    sd = {}

    def conv(name, c_out, c_in, k, transposed=False):
        shape = (c_in, c_out, *k) if transposed else (c_out, c_in, *k)
        sd[f"{name}.conv.weight"] = randn(gen, *shape, std=(c_in * math.prod(k)) ** -0.5)
        sd[f"{name}.conv.bias"] = randn(gen, c_out, std=0.1)

    def res(name, c):
        conv(f"{name}.conv1", c, c, (3, 3, 3))
        conv(f"{name}.conv2", c, c, (3, 3, 3))

    conv("encoder.blocks.0", 8, 1, (4, 4, 4))
    res("encoder.blocks.1", 8)
    conv("encoder.blocks.2", 16, 8, (4, 4, 1))
    res("encoder.blocks.3", 16)
    conv("encoder.blocks.4", 4, 16, (3, 3, 3))
    conv("decoder.blocks.0", 16, 4, (3, 3, 3))
    res("decoder.blocks.1", 16)
    conv("decoder.blocks.2", 8, 16, (4, 4, 1), transposed=True)
    res("decoder.blocks.3", 8)
    conv("decoder.blocks.4", 1, 8, (4, 4, 4), transposed=True)
    sd["quantizer.quantizer.embedding.weight"] = randn(gen, 32, 4)
    sd["quantizer.quantizer.ema_cluster_size"] = torch.rand(32, generator=gen)
    sd["quantizer.quantizer.ema_w"] = randn(gen, 32, 4)
    return sd


def ref_asymmetric_decode(sd, z):
    def res(name, x):
        h = F.relu(F.conv3d(x, sd[f"{name}.conv1.conv.weight"], sd[f"{name}.conv1.conv.bias"], padding=1))
        return F.relu(x + F.conv3d(h, sd[f"{name}.conv2.conv.weight"], sd[f"{name}.conv2.conv.bias"], padding=1))

    h = F.conv3d(z, sd["decoder.blocks.0.conv.weight"], sd["decoder.blocks.0.conv.bias"], padding=1)
    h = res("decoder.blocks.1", h)
    h = F.relu(F.conv_transpose3d(h, sd["decoder.blocks.2.conv.weight"], sd["decoder.blocks.2.conv.bias"],
                                  stride=(2, 2, 1), padding=(1, 1, 0)))
    h = res("decoder.blocks.3", h)
    return F.conv_transpose3d(h, sd["decoder.blocks.4.conv.weight"], sd["decoder.blocks.4.conv.bias"], stride=2,
                              padding=1)


def test_asymmetric_cardiodit_vqgan_from_shapes_and_yaml(tmp_path):
    from medgen_rt.convert.common import PublishedConfig, Source, read_configs
    from medgen_rt.convert.vqgan import convert_vqgan

    sd = asymmetric_vqgan_state(torch.Generator().manual_seed(30))
    model, config = convert_vqgan(Source(sd, "vqgan"), PublishedConfig(), cine=True)
    assert model.downsample_factor == (4, 4, 2)
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump({"model": {"params": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_channels": [8, 16], "num_res_channels": [8, 16],
        "num_res_layers": 1, "num_embeddings": 32, "embedding_dim": 4, "epsilon": "1e-5",
        "downsample_parameters": [[2, 4, 1, 1], [[2, 2, 1], [4, 4, 1], 1, [1, 1, 0]]],
        "upsample_parameters": [[[2, 2, 1], [4, 4, 1], 1, [1, 1, 0], [0, 0, 0]], [2, 4, 1, 1, 0]]}}}))
    _, from_yaml = convert_vqgan(Source(sd, "vqgan"), read_configs([tmp_path / "s1.yaml"]), cine=True,
                                 dead_code_threshold=0.0)
    assert from_yaml["downsample_parameters"] == config["downsample_parameters"]
    assert from_yaml["upsample_parameters"] == [[[2, 2, 1], [4, 4, 1], 1, [1, 1, 0], [0, 0, 0]], [2, 4, 1, 1, 0]]
    z = torch.randn(1, 4, 4, 4, 8, generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        assert rel_err(model.decode(z), ref_asymmetric_decode(sd, z)) < TOL
    bad = dict(sd, **{"quantizer.quantizer.extra": torch.ones(1)})
    bad.pop("quantizer.quantizer.ema_w")
    with pytest.raises(ValueError, match=r"unknown key.*quantizer\.quantizer\.extra.*missing key.*ema_w"):
        convert_vqgan(Source(bad, "vqgan"), PublishedConfig(), cine=True)


# ---- MedLoRD -------------------------------------------------------------------------------------

UNET = dict(spatial_dims=3, in_channels=4, num_res_blocks=1, channels=(8, 16), attention_levels=(False, True),
            num_head_channels=(0, 8), norm_num_groups=4)
_QKV = re.compile(r"^(.*)\.attn\.to_([qkv])\.(weight|bias)$")


def _randomize(net, gen):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(randn(gen, *p.shape, std=p[0].numel() ** -0.5))
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + randn(gen, *p.shape, std=0.1))
    return net.eval()


def to_published_names(state, gen, out_index=None):
    """MONAI core names -> the published MONAI Generative ones (MedLoRD's U-Net / ControlNet), with the
    attention output projection the published blocks create but never apply."""
    old = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            old[f"{m.group(1)}.to_{m.group(2)}.{m.group(3)}"] = value
            if m.group(2) == "q" and m.group(3) == "weight":
                n = value.shape[0]
                old[f"{m.group(1)}.proj_attn.weight"] = randn(gen, n, n)
                old[f"{m.group(1)}.proj_attn.bias"] = randn(gen, n)
            continue
        key = key.replace(".upsampler.postconv.", ".upsampler.conv.")
        if out_index is not None and key.startswith("out.2."):
            key = f"out.{out_index}." + key[len("out.2."):]
        old[key] = value
    return old


@pytest.fixture(scope="module")
def medlord(tmp_path_factory):
    root = tmp_path_factory.mktemp("medlord")
    gen = torch.Generator().manual_seed(20)
    net = monai_vqvae(gen)
    torch.save({"state_dict": net.state_dict()}, root / "vqgan.pth")  # the older MedLoRD stage-1 layout
    unet = _randomize(DiffusionModelUNet(out_channels=4, include_fc=False, **UNET), gen)
    control = _randomize(ControlNet(conditioning_embedding_in_channels=2,
                                    conditioning_embedding_num_channels=(4, 8, 8), include_fc=False, **UNET), gen)
    (root / "ldm.yaml").write_text(yaml.safe_dump({"ldm": {"params": {
        "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_res_blocks": 1, "num_channels": [8, 16],
        "attention_levels": [False, True], "with_conditioning": False, "num_head_channels": [0, 8],
        "norm_num_groups": 4, "use_flash_attention": True},
        "scheduler": {"schedule": "cosine", "num_train_timesteps": 1000, "prediction_type": "v_prediction"}}}))
    torch.save(to_published_names(control.state_dict(), gen), root / "controlnet.pth")  # a bare final state_dict
    return {"root": root, "gen": gen, "net": net, "unet": unet, "control": control}


def _monai_reference(medlord, published, silu: bool):
    """MONAI's own U-Net loading the published names with its load_old_state_dict."""
    ref = DiffusionModelUNet(out_channels=4, include_fc=False, **UNET)
    ref.load_old_state_dict({(("out.2." + k[6:]) if k.startswith("out.1.") else k): v for k, v in published.items()})
    if not silu:  # MedLoRD's out block: GroupNorm, (SiLU commented out), conv
        ref.out[1] = torch.nn.Identity()
    return ref.eval()


def test_medlord_unet_and_controlnet_match_monai(medlord, tmp_path):
    root, gen = medlord["root"], medlord["gen"]
    published = to_published_names(medlord["unet"].state_dict(), gen, out_index=2)  # unmodified MONAI Generative
    torch.save({"model": published, "ema": {"decay": 0.999, "shadow": dict(published)}}, tmp_path / "ldm.pth")
    result = convert("medlord", [root / "vqgan.pth", tmp_path / "ldm.pth", root / "controlnet.pth"], tmp_path / "out",
                     configs=[root / "ldm.yaml"], options=ConvertOptions(latent_shape=(8, 8, 8), scale_factor=0.9))
    unet, info = load_model(result["runs"]["unet"])
    assert info["diffusion"]["timesteps"] == 1000 and info["latent_shape"] == [4, 8, 8, 8]
    assert any("proj_attn" in k for k in info["conversion"]["dropped_tensors"])
    ref = _monai_reference(medlord, published, silu=True)
    x = torch.randn(2, 4, 8, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert rel_err(unet.eval()(x, t), ref(x, t)) < TOL

    controlled, cinfo = load_model(result["runs"]["controlnet"])
    assert cinfo["config"]["mask_downsample"] == 4 and cinfo["mask_labels"] == [1, 2]
    mask = (torch.rand(2, 2, 32, 32, 32, generator=gen) > 0.5).float()
    with torch.no_grad():
        down, mid = medlord["control"](x, t, controlnet_cond=mask, conditioning_scale=1.0)
        expected = ref(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        assert rel_err(controlled.eval()(x, t, mask), expected) < TOL
    vae, _ = load_model(result["runs"]["vae"])
    check_vqgan(vae.eval(), medlord["net"], torch.randn(1, 1, 16, 16, 16, generator=gen))


def test_medlord_output_layer_without_silu(medlord, tmp_path):
    """MedLoRD's published U-Net has no SiLU before the output conv (key out.1.conv.*)."""
    root, gen = medlord["root"], medlord["gen"]
    published = to_published_names(medlord["unet"].state_dict(), gen, out_index=1)
    torch.save({"diffusion": published}, tmp_path / "ldm.pth")  # the older MedLoRD LDM checkpoint layout
    ckpts = [root / "vqgan.pth", tmp_path / "ldm.pth"]
    options = dict(latent_shape=(8, 8, 8))
    ref = _monai_reference(medlord, published, silu=False)
    x = torch.randn(1, 4, 8, 8, 8, generator=gen)
    t = torch.tensor([42])
    if unet_supports_out_silu():
        result = convert("medlord", ckpts, tmp_path / "out", configs=[root / "ldm.yaml"],
                         options=ConvertOptions(**options))
        unet, _ = load_model(result["runs"]["unet"])
        with torch.no_grad():
            assert rel_err(unet.eval()(x, t), ref(x, t)) < TOL
        return
    with pytest.raises(ValueError, match="SiLU"):
        convert("medlord", ckpts, tmp_path / "out", configs=[root / "ldm.yaml"], options=ConvertOptions(**options))
    result = convert("medlord", ckpts, tmp_path / "out", configs=[root / "ldm.yaml"],
                     options=ConvertOptions(allow_deviations=True, **options))
    unet, info = load_model(result["runs"]["unet"])
    assert info["conversion"]["deviations"]
    with torch.no_grad():
        assert rel_err(unet.eval()(x, t), ref(x, t)) > 1e-3
