"""MedLoRD's lightweight ControlNet (Cardio-AI/medlord src/models/controlnet.py) in medgen_rt.

A checkpoint is built here with the published parameter names and shapes (random
values, small sizes) in the published trainer's layout (epoch, optimizer, EMA
shadow), converted with `medgen convert medlord`, and compared with a forward
written below from the published formulas in plain torch.nn.functional over the
raw tensors, sharing no code with medgen_rt (fp32, relative 1e-5 of the largest
reference value). The U-Net the residuals feed is MONAI's own, loaded from the
published names (as in test_convert.py).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import DiffusionModelUNet
from test_convert import TOL, _randomize, monai_vqvae, randn, rel_err, timestep_embedding, to_published_names

from medgen_rt.convert import ConversionError, ConvertOptions, convert
from medgen_rt.models import build_model, load_model

UNET = dict(spatial_dims=3, in_channels=4, num_res_blocks=2, channels=(8, 16, 16),
            attention_levels=(False, True, True), num_head_channels=(0, 8, 8), norm_num_groups=4)
# the published ControlNet settings at test size: r 0.5 -> widths (4, 8, 8); 2 heads of 4 channels
CONTROL = dict(r=0.5, heads=(0, 4, 4), groups=4, mask_channels=2, embedding=(4, 8), initial_stride=2)
LATENT = (8, 8, 8)
IMAGE = (32, 32, 32)  # the VQ-GAN's 4x: masks at image size, as the published sampler feeds them


# ---- a published-layout lightweight ControlNet state_dict ------------------------------------------

def published_controlnet_state(gen, transformer: bool) -> dict:
    """Names and shapes of the published ControlNet(num_channels=UNET channels, r, ...), random values."""
    c = CONTROL
    unet = UNET["channels"]
    widths = [max(1, int(ch * c["r"])) for ch in unet]
    temb = 4 * widths[0]
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = randn(gen, cout, cin, k, k, k, std=(cin * k ** 3) ** -0.5)
        sd[f"{name}.bias"] = randn(gen, cout, std=0.1)

    def linear(name, cout, cin, bias=True):
        sd[f"{name}.weight"] = randn(gen, cout, cin, std=cin ** -0.5)
        if bias:
            sd[f"{name}.bias"] = randn(gen, cout, std=0.1)

    def norm(name, ch):
        sd[f"{name}.weight"] = 1.0 + randn(gen, ch, std=0.1)
        sd[f"{name}.bias"] = randn(gen, ch, std=0.1)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1.conv", cout, cin, 3)
        linear(f"{p}.time_emb_proj", cout, temb)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2.conv", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection.conv", cout, cin, 1)

    def attention(p, ch):
        norm(f"{p}.norm", ch)
        if not transformer:  # AttentionBlock: q, k, v with bias, proj_attn created (never applied)
            for n in ("to_q", "to_k", "to_v", "proj_attn"):
                linear(f"{p}.{n}", ch, ch)
            return
        conv(f"{p}.proj_in.conv", ch, ch, 1)  # SpatialTransformer, one BasicTransformerBlock
        b = f"{p}.transformer_blocks.0"
        for a in ("attn1", "attn2"):
            for n in ("to_q", "to_k", "to_v"):
                linear(f"{b}.{a}.{n}", ch, ch, bias=False)
            linear(f"{b}.{a}.to_out.0", ch, ch)
        linear(f"{b}.ff.linear1", 8 * ch, ch)  # GEGLU: 2 x mlp_dim (4 x ch)
        linear(f"{b}.ff.linear2", ch, 4 * ch)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{b}.{n}", ch)
        conv(f"{p}.proj_out.conv", ch, ch, 1)

    conv("conv_in.conv", widths[0], UNET["in_channels"], 3)
    linear("time_embed.0", temb, widths[0])
    linear("time_embed.2", temb, temb)
    emb = c["embedding"]
    conv("controlnet_cond_embedding.conv_in.conv", emb[0], c["mask_channels"], 3)
    for i in range(len(emb) - 1):
        conv(f"controlnet_cond_embedding.blocks.{2 * i}.conv", emb[i], emb[i], 3)
        conv(f"controlnet_cond_embedding.blocks.{2 * i + 1}.conv", emb[i + 1], emb[i], 3)
    conv("controlnet_cond_embedding.conv_out", widths[0], emb[-1], 3)
    projections = [(widths[0], unet[0])]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(UNET["num_res_blocks"]):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else w, w)
            if UNET["attention_levels"][i]:
                attention(f"down_blocks.{i}.attentions.{j}", w)
            projections.append((w, unet[i]))
        if i < len(widths) - 1:
            conv(f"down_blocks.{i}.downsampler.op.conv", w, w, 3)
            projections.append((w, unet[i]))
        cin = w
    resnet("middle_block.resnet_1", widths[-1], widths[-1])
    attention("middle_block.attention", widths[-1])
    resnet("middle_block.resnet_2", widths[-1], widths[-1])
    for k, (cin, cout) in enumerate(projections):
        conv(f"controlnet_down_blocks.{k}", cout, cin, 1)
    conv("controlnet_mid_block", unet[-1], widths[-1], 1)
    return sd


# ---- the published forward, from its formulas ---------------------------------------------------------

def _conv(x, sd, name, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv3d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)


def _gn(x, sd, name):
    return F.group_norm(x, CONTROL["groups"], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _linear(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _resnet(x, emb, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1.conv")
    h = h + _linear(F.silu(emb), sd, f"{p}.time_emb_proj")[:, :, None, None, None]
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2.conv")
    skip = _conv(x, sd, f"{p}.skip_connection.conv") if f"{p}.skip_connection.conv.weight" in sd else x
    return skip + h


def _multihead(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head; channels split into heads as contiguous blocks."""
    b, n, ch = q.shape
    split = [a.reshape(b, -1, heads, ch // heads).transpose(1, 2) for a in (q, k, v)]
    weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(ch // heads), dim=-1)
    return (weights @ split[2]).transpose(1, 2).reshape(b, n, ch)


def _attention(x, sd, p, head, transformer):
    b, ch = x.shape[:2]
    heads = ch // head
    tokens = lambda v: v.reshape(b, ch, -1).transpose(1, 2)  # noqa: E731  (B, N, C), voxels in (D, H, W) order
    volume = lambda t: t.transpose(1, 2).reshape(x.shape)  # noqa: E731
    if not transformer:  # proj_attn is never applied by the published AttentionBlock
        h = tokens(_gn(x, sd, f"{p}.norm"))
        return volume(_multihead(*(_linear(h, sd, f"{p}.to_{n}") for n in "qkv"), heads)) + x
    h = tokens(_conv(_gn(x, sd, f"{p}.norm"), sd, f"{p}.proj_in.conv"))
    blk = f"{p}.transformer_blocks.0"

    def ln(name, t):
        return F.layer_norm(t, (ch,), sd[f"{blk}.{name}.weight"], sd[f"{blk}.{name}.bias"])  # eps 1e-5

    def attn(name, t):
        return _linear(_multihead(*(_linear(t, sd, f"{blk}.{name}.to_{n}") for n in "qkv"), heads), sd,
                       f"{blk}.{name}.to_out.0")

    h = attn("attn1", ln("norm1", h)) + h
    h = attn("attn2", ln("norm2", h)) + h  # no context given: the "cross" attention attends to h itself
    value, gate = _linear(ln("norm3", h), sd, f"{blk}.ff.linear1").chunk(2, dim=-1)
    h = _linear(value * F.gelu(gate), sd, f"{blk}.ff.linear2") + h
    return _conv(volume(h), sd, f"{p}.proj_out.conv") + x


def ref_controlnet(sd, x, t, mask, transformer, scale=1.0):
    """(down residuals, mid residual) of the published ControlNet.forward."""
    emb = timestep_embedding(t, sd["conv_in.conv.weight"].shape[0])
    emb = _linear(F.silu(_linear(emb, sd, "time_embed.0")), sd, "time_embed.2")
    m = F.silu(_conv(mask, sd, "controlnet_cond_embedding.conv_in.conv", stride=CONTROL["initial_stride"]))
    for j in range(2 * (len(CONTROL["embedding"]) - 1)):  # refinement (stride 1), then downsampling (stride 2)
        m = F.silu(_conv(m, sd, f"controlnet_cond_embedding.blocks.{j}.conv", stride=1 + j % 2))
    h = _conv(x, sd, "conv_in.conv") + _conv(m, sd, "controlnet_cond_embedding.conv_out")
    features = [h]
    levels = len(UNET["channels"])
    for i in range(levels):
        for j in range(UNET["num_res_blocks"]):
            h = _resnet(h, emb, sd, f"down_blocks.{i}.resnets.{j}")
            if UNET["attention_levels"][i]:
                h = _attention(h, sd, f"down_blocks.{i}.attentions.{j}", CONTROL["heads"][i], transformer)
            features.append(h)
        if i < levels - 1:
            h = _conv(h, sd, f"down_blocks.{i}.downsampler.op.conv", stride=2)
            features.append(h)
    h = _resnet(h, emb, sd, "middle_block.resnet_1")
    h = _attention(h, sd, "middle_block.attention", CONTROL["heads"][-1], transformer)
    h = _resnet(h, emb, sd, "middle_block.resnet_2")
    down = [_conv(f, sd, f"controlnet_down_blocks.{k}") * scale for k, f in enumerate(features)]
    return down, _conv(h, sd, "controlnet_mid_block") * scale


# ---- published checkpoints ------------------------------------------------------------------------------

def published_yaml(path, transformer: bool):
    """controlnet_new.yaml's layout at test size."""
    c = CONTROL
    path.write_text(yaml.safe_dump({
        "controlnet": {"condition_keys": ["aorta", "ventricle_l"], "params": {
            "spatial_dims": 3, "in_channels": 4, "num_res_blocks": 2, "num_channels": list(UNET["channels"]),
            "attention_levels": list(UNET["attention_levels"]), "with_conditioning": transformer,
            "num_head_channels": list(c["heads"]), "norm_num_groups": c["groups"], "r": c["r"],
            "conditioning_embedding_in_channels": c["mask_channels"],
            "conditioning_embedding_num_channels": list(c["embedding"]), "initial_stride": c["initial_stride"],
            "use_flash_attention": True}},
        "pretrained_model": {"params": {
            "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_res_blocks": 2,
            "num_channels": list(UNET["channels"]), "attention_levels": list(UNET["attention_levels"]),
            "with_conditioning": False, "num_head_channels": list(UNET["num_head_channels"]),
            "norm_num_groups": UNET["norm_num_groups"], "use_flash_attention": True}},
        "ldm": {"scheduler": {"schedule": "cosine", "num_train_timesteps": 300, "prediction_type": "v_prediction"}},
        "training": {"scale_factor": 1.0, "use_ema": True, "ema_decay": 0.999, "control_dropout": 0.1}}))
    return path


def trainer_checkpoint(path, raw: dict, shadow: dict, epoch: int = 12):
    """ControlNetTrainer / LDM trainer layout: model, EMA {decay, shadow}, optimizer, lr_scheduler, epoch."""
    torch.save({"epoch": epoch, "best_loss": 0.25, "model": raw,
                "optimizer": {"state": {}, "param_groups": [{"lr": 7.5e-5, "params": [0, 1]}]},
                "lr_scheduler": {"gamma": 0.999, "last_epoch": epoch}, "ema": {"decay": 0.999, "shadow": shadow}},
               path)


def _perturbed(gen, sd):
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def _published(root, transformer: bool) -> dict:
    """VQ-GAN, U-Net (raw + EMA) and lightweight ControlNet (raw + EMA) in the published layouts."""
    gen = torch.Generator().manual_seed(31)
    vq = monai_vqvae(gen)
    torch.save({"state_dict": vq.state_dict()}, root / "vqgan.pth")
    monai_unet = _randomize(DiffusionModelUNet(out_channels=4, include_fc=False, **UNET), gen)
    unet_raw = to_published_names(monai_unet.state_dict(), gen, out_index=1)  # MedLoRD: no SiLU before out conv
    unet_ema = {**unet_raw, **_perturbed(gen, unet_raw)}
    trainer_checkpoint(root / "ldm.pth", unet_raw, unet_ema)
    cn_raw = published_controlnet_state(gen, transformer)
    cn_ema = {**cn_raw, **_perturbed(gen, cn_raw)}
    trainer_checkpoint(root / "controlnet.pth", cn_raw, cn_ema)
    published_yaml(root / "controlnet.yaml", transformer)
    return {"root": root, "gen": gen, "transformer": transformer, "unet_raw": unet_raw, "unet_ema": unet_ema,
            "cn_raw": cn_raw, "cn_ema": cn_ema}


@pytest.fixture(scope="module", params=[True, False], ids=["transformer", "self-attention"])
def published_each(request, tmp_path_factory):
    """Both attention kinds of the published ControlNet (with_conditioning true, as published, and false)."""
    return _published(tmp_path_factory.mktemp("medlord-light"), request.param)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published setting (with_conditioning: true)."""
    return _published(tmp_path_factory.mktemp("medlord-light"), True)


def _files(p):
    root = p["root"]
    return [root / "controlnet.pth", root / "vqgan.pth", root / "ldm.pth"]


def monai_unet_reference(published_state):
    """MONAI's U-Net holding the published tensors (out.1: MedLoRD's output conv, no SiLU before it)."""
    ref = DiffusionModelUNet(out_channels=4, include_fc=False, **UNET)
    ref.load_old_state_dict({(("out.2." + k[6:]) if k.startswith("out.1.") else k): v
                             for k, v in published_state.items()})
    ref.out[1] = torch.nn.Identity()
    return ref.eval()


def _mask(gen, batch=2):
    """One-hot of a label map with labels 1 and 2 (0: background), at image size."""
    labels = torch.randint(0, 3, (batch, *IMAGE), generator=gen)
    return torch.stack([labels == 1, labels == 2], dim=1).float()


# ---- tests -----------------------------------------------------------------------------------------------

def test_converted_controlnet_matches_published_forward(published_each, tmp_path):
    from medgen_rt.cli import main

    published = published_each

    out = tmp_path / "model"
    assert main(["convert", "medlord", *map(str, _files(published)), "--config",
                 str(published["root"] / "controlnet.yaml"), "--out", str(out), "--latent-shape", *map(str, LATENT),
                 "--mask-labels", "3", "5"]) == 0
    controlled, info = load_model(out / "controlnet")
    controlled.eval()
    cfg = info["config"]
    assert cfg["variant"] == "lightweight" and cfg["r"] == 0.5 and cfg["initial_stride"] == 2
    assert cfg["mask_downsample"] == 4 and cfg["embedding_channels"] == [4, 8] and cfg["mask_channels"] == 2
    assert cfg["transformer_attention"] == published["transformer"] and info["mask_labels"] == [3, 5]
    conv = info["conversion"]
    by_file = {s["path"].rsplit("/", 1)[-1]: s for s in conv["sources"]}
    # the published sample_controlnet.py: ControlNet EMA shadow, U-Net raw "model" weights
    assert by_file["controlnet.pth"]["weights"] == "ema" and by_file["ldm.pth"]["weights"] == "raw"
    assert {"optimizer", "epoch", "lr_scheduler", "best_loss"} <= set(by_file["controlnet.pth"]["ignored_entries"])
    assert conv["unet_weights"]["chosen"] == "raw" and conv["unet_weights"]["asked"] == "default"
    assert any("published order: aorta, ventricle_l" in n for n in conv["notes"])
    if not published["transformer"]:
        assert any(k.endswith("proj_attn.weight") and "controlnet.pth" in k for k in conv["dropped_tensors"])

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, *LATENT, generator=gen)
    t = torch.tensor([7, 260])
    mask = _mask(gen)
    with torch.no_grad():
        down, mid = controlled.controlnet(x, t, mask)
        ref_down, ref_mid = ref_controlnet(published["cn_ema"], x, t, mask, published["transformer"])
        assert len(down) == len(ref_down) == 9
        for ours, ref in zip(down + [mid], ref_down + [ref_mid]):
            assert rel_err(ours, ref) < TOL
        # the whole denoiser: MONAI's U-Net on the published raw U-Net tensors, plus the residuals
        unet = monai_unet_reference(published["unet_raw"])
        want = unet(x, t, down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid)
        assert rel_err(controlled(x, t, mask), want) < TOL
        controlled.conditioning_scale = 0.5  # sample_controlnet.py --conditioning_scale
        ref_down, ref_mid = ref_controlnet(published["cn_ema"], x, t, mask, published["transformer"], scale=0.5)
        want = unet(x, t, down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid)
        assert rel_err(controlled(x, t, mask), want) < TOL
        assert rel_err(controlled(x, t, mask), unet(x, t)) > 1e-3  # the mask does change the output


def test_unet_weights_choice_is_honoured(published, tmp_path):
    root = published["root"]
    cfg = [root / "controlnet.yaml"]
    key = "unet.conv_in.conv.weight"
    opts = dict(latent_shape=LATENT)
    default = convert("medlord", _files(published), tmp_path / "a", configs=cfg, options=ConvertOptions(**opts))
    ema = convert("medlord", _files(published), tmp_path / "b", configs=cfg,
                  options=ConvertOptions(unet_weights="ema", **opts))
    alone = convert("medlord", [root / "vqgan.pth", root / "ldm.pth"], tmp_path / "c", configs=cfg,
                    options=ConvertOptions(**opts))  # no ControlNet: sample_ldm.py's EMA
    for result, want, chosen in ((default, "unet_raw", "raw"), (ema, "unet_ema", "ema"), (alone, "unet_ema", "ema")):
        for run in ("unet", "controlnet"):
            if run not in result["runs"]:
                continue
            net, info = load_model(result["runs"][run])
            state = net.state_dict()
            assert torch.equal(state[key if run == "unet" else "base." + key], published[want]["conv_in.conv.weight"])
            assert info["conversion"]["unet_weights"]["chosen"] == chosen
    assert any("--unet-weights ema" in n for n in default["notes"])
    # the ControlNet keeps its EMA weights whichever U-Net weights are chosen
    net, _ = load_model(ema["runs"]["controlnet"])
    assert torch.equal(net.state_dict()["controlnet.conv_in.conv.weight"], published["cn_ema"]["conv_in.conv.weight"])
    # a final (bare) U-Net state_dict has no EMA weights to give
    torch.save(published["unet_raw"], tmp_path / "final_model.pth")
    with pytest.raises(ConversionError, match="--unet-weights ema.*no EMA"):
        convert("medlord", [root / "vqgan.pth", tmp_path / "final_model.pth", root / "controlnet.pth"],
                tmp_path / "d", configs=cfg, options=ConvertOptions(unet_weights="ema", **opts))
    with pytest.raises(ValueError, match="--unet-weights is for medlord"):
        convert("voldit", _files(published), tmp_path / "e", options=ConvertOptions(unet_weights="raw"))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"controlnet_cond_embedding.extra.weight": torch.zeros(3)}),
     r"unknown key\(s\) controlnet_cond_embedding\.extra\.weight"),
    (lambda sd: sd.pop("controlnet_down_blocks.4.bias"), r"missing key\(s\) controlnet_down_blocks\.4\.bias"),
    (lambda sd: sd.update({"down_blocks.1.resnets.0.conv2.conv.weight": torch.zeros(8, 8, 1, 1, 1)}),
     r"wrong shape\(s\): down_blocks\.1\.resnets\.0\.conv2\.conv\.weight: checkpoint \(8, 8, 1, 1, 1\)"),
])
def test_left_over_and_missing_keys_are_named(published, tmp_path, edit, message):
    sd = dict(published["cn_raw"])
    edit(sd)
    torch.save(sd, tmp_path / "final_model.pth")  # the ControlNet trainer's bare final state_dict
    files = [published["root"] / "vqgan.pth", published["root"] / "ldm.pth", tmp_path / "final_model.pth"]
    with pytest.raises(ConversionError, match=message) as err:
        convert("medlord", files, tmp_path / "out", configs=[published["root"] / "controlnet.yaml"],
                options=ConvertOptions(latent_shape=LATENT))
    assert "final_model.pth" in str(err.value)


def test_config_mismatches_are_refused(published, tmp_path):
    root = published["root"]
    data = yaml.safe_load((root / "controlnet.yaml").read_text())
    for edit, message in ((("r", 0.25), "not max\\(1, int\\(r \\* C\\)\\) for r 0.25"),
                          (("initial_stride", 1), "shrinks masks 2x, the VQ-GAN images 4x"),
                          (("with_conditioning", False), "with_conditioning False but the checkpoint has")):
        params = {**data["controlnet"]["params"], edit[0]: edit[1]}
        path = tmp_path / f"{edit[0]}.yaml"
        path.write_text(yaml.safe_dump({**data, "controlnet": {"params": params}}))
        with pytest.raises(ConversionError, match=message):
            convert("medlord", _files(published), tmp_path / "out", configs=[path],
                    options=ConvertOptions(latent_shape=LATENT))


def test_converted_controlnet_samples_in_the_masks_geometry(published, tmp_path):
    """`medgen sample --model converted/controlnet --masks LABELMAP`: the CT has the mask's grid and affine."""
    import nibabel as nib

    from medgen_rt.cli import main

    out = tmp_path / "model"
    convert("medlord", _files(published), out, configs=[published["root"] / "controlnet.yaml"],
            options=ConvertOptions(latent_shape=LATENT))
    labels = np.zeros(IMAGE, dtype=np.int16)
    labels[4:20, 6:18, 8:24] = 1
    labels[18:28, 10:26, 4:14] = 2
    # the converted model records 1 mm voxels (no geometry in a published checkpoint); LPS-flipped, shifted
    affine = np.array([[-1.0, 0, 0, 120.0], [0, -1.0, 0, 95.0], [0, 0, 1.0, -310.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "labels.nii.gz"))
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(out / "controlnet"), "--masks", str(tmp_path / "labels.nii.gz"),
                 "--steps", "2", "--no-energy", "--quiet", "--out", str(samples)]) == 0
    ct = nib.load(str(samples / "sample_000.nii.gz"))
    assert ct.shape == IMAGE and np.allclose(ct.affine, affine)
    side = json.loads((samples / "sample_000.json").read_text())
    assert side["kind"] == "controlnet"


def test_lightweight_controlnet_is_selectable_for_training():
    """control.controlnet {variant: lightweight, ...} in a training config builds MedLoRD's ControlNet:
    neutral at the start (zero projections), only it trains, every setting resolved for model.json."""
    base_info = {"kind": "unet", "config": {**UNET, "out_channels": 4}}
    base = build_model(base_info)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    info = {"kind": "controlnet", "base": base_info,
            "config": {"variant": "lightweight", "mask_channels": 2, "mask_downsample": 4, "r": 0.5,
                       "num_head_channels": [0, 4, 4]}}
    model = build_model(info, base=base)
    opts = model.options
    assert opts["initial_stride"] == 2 and opts["embedding_channels"] == [32, 64] and opts["transformer_attention"]
    assert opts["norm_num_groups"] == 4 and opts["variant"] == "lightweight"
    assert sum(p.numel() for p in model.controlnet.parameters()) < sum(p.numel() for p in base.parameters())
    rebuilt = build_model({**info, "config": opts}, base=base)  # model.json's config rebuilds the same network
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x, t, mask = torch.randn(1, 4, *LATENT), torch.tensor([40]), _mask(torch.Generator().manual_seed(0), 1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, mask), base.eval()(x, t))
    model.train()
    model(x, t, mask).square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    assert model.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown setting"):
        build_model({**info, "config": {**info["config"], "ratio": 0.5}}, base=base)
    with pytest.raises(ValueError, match="settings of variant 'lightweight'"):
        build_model({**info, "config": {"mask_channels": 2, "r": 0.5}}, base=base)
    with pytest.raises(ValueError, match="not all multiples of norm_num_groups"):
        build_model({**info, "config": {**info["config"], "r": 0.25}}, base=base)


# ---- MedLoRD's low-resource path: the planner ------------------------------------------------------------

MEDLORD_LATENT = (8, 128, 128, 64)  # ct-ds4 latent of the published 512x512x256 CT


@pytest.fixture(scope="module")
def medlord_path():
    """The published sizes: U-Net 64/128/256/512 (no SiLU before its output conv), lightweight ControlNet
    (r 0.5, six masks, initial_stride 2), ct-ds4 VQ-GAN; random weights (memory does not depend on them)."""
    from medgen_rt.models.unet import ControlledUNet, UNetDenoiser, unet_config
    from medgen_rt.models.vqgan import build_vqgan

    torch.manual_seed(0)
    base = UNetDenoiser(unet_config("medlord", out_silu=False))
    net = ControlledUNet(base, mask_channels=6, mask_downsample=4, variant="lightweight").eval()
    return net, build_vqgan("ct-ds4").eval()


def test_medlord_path_plans_for_24gb_and_8gb_cards(medlord_path):
    """Unguided, as the published sampler runs (planned analytically: the networks are on the CPU)."""
    from medgen_rt.sampling.planner import GIB, condition_bytes, plan_sampling

    net, vae = medlord_path
    plans = {gb: plan_sampling(net, vae, MEDLORD_LATENT, n=1, max_vram=f"{gb}GB", device="cuda", measure=False)
             for gb in (24, 8)}
    for gb, plan in plans.items():
        assert plan.denoiser_dtype == "bfloat16" and plan.batch == 1 and plan.decode_chunk >= 1
        assert all(0 < v < gb * GIB for v in plan.predicted_peak_bytes.values())
        json.dumps(plan.to_dict())
    # the denoise phase is the same on both cards; only the decode's chunk shrinks
    assert plans[24].predicted_peak_bytes["denoise"] == plans[8].predicted_peak_bytes["denoise"]
    assert plans[8].decode_chunk < plans[24].decode_chunk
    # the six-label mask at 512x512x256 that the sampler holds, in the network's dtype (bf16); with guidance
    # also its null and, per call, the two concatenated
    mask = 6 * 512 * 512 * 256
    assert condition_bytes(net, vae, MEDLORD_LATENT, False, torch.bfloat16) == mask * 2
    assert condition_bytes(net, vae, MEDLORD_LATENT, True, torch.bfloat16) == mask * 2 * 4
    assert condition_bytes(net, vae, MEDLORD_LATENT, False, torch.float32) == mask * 4
    # the networks' live activations, 2.9 kB per latent voxel (bf16): 2.8 GiB at 128x128x64
    assert 2 * GIB < plans[8].costs["denoise"]["per_unit"] * math.prod(MEDLORD_LATENT[1:]) < 4 * GIB


def _allocated_peak(fn) -> int:
    """Peak bytes that torch's CPU allocator holds while fn runs, above what it held before:
    the allocation and free events of torch.profiler (profile_memory), summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("latent", [(8, 32, 32, 16), (8, 64, 64, 32)])
def test_planned_unet_controlnet_memory_bounds_the_measured(latent, one_thread):
    """The planner's U-Net + ControlNet activations against torch's CPU allocator (fp32): a bound,
    not far above. MedLoRD's layout at half width: predicted 65.0 / 520.0 MiB, allocated 49.1 / 392.1 MiB
    at these two latents; at its full 64..512 channels (15 s) predicted 90.7 / 725.6 MiB, allocated
    80.0 / 630.8 MiB, peak RSS of a subprocess 86.0 / 640.5 MiB (MALLOC_MMAP_THRESHOLD_ fixed)."""
    from medgen_rt.models.unet import ControlledUNet, UNetDenoiser, unet_config
    from medgen_rt.sampling.planner import analytic_denoise_cost, denoiser_inputs

    torch.manual_seed(0)
    base = UNetDenoiser(unet_config("medlord", channels=(32, 64, 128, 256), num_head_channels=(0, 0, 16, 16),
                                    norm_num_groups=16, out_silu=False))
    net = ControlledUNet(base, mask_channels=6, mask_downsample=4, variant="lightweight").eval()
    predicted = analytic_denoise_cost(net, latent, torch.float32).per_unit * math.prod(latent[1:])
    inputs = denoiser_inputs(net, latent[0], latent[1:], "cpu", torch.float32)
    with torch.no_grad():
        measured = _allocated_peak(lambda: net(*inputs))
    assert measured < predicted < 1.5 * measured, (predicted / 2 ** 20, measured / 2 ** 20)
