"""Quality and copying while a denoiser trains (DESIGN §7, Dar et al.: over-training
increases memorisation).

At every validation interval the EMA model samples a few volumes with a few-step
sampler; they are decoded by the run's VQ-GAN and scored against references that also
passed through that decoder (reconstructions of training and validation latents), so
the decoder's own blur counts against neither side:

* realism: each sample's best Pearson r with the validation volumes, relative to the
  validation volumes' own leave-one-out figure (``evaluation.memorization.nn_realism``);
  about 1 when samples sit as close to the population as new subjects do;
* copy rate: the share of samples whose nearest training volume correlates above the
  threshold of ``medgen eval memorization`` (95th percentile of new subjects' nearest-training
  r, ``evaluation.memorization.copy_null``). The rule is the same; the embedding here is the downsampled
  image itself, not the contrastive encoder, which would cost minutes per interval;
* mmd2: unbiased MMD^2 between samples and validation volumes (0 for the same population);
* local_realism: ``medgen eval quality``'s patch figure (``evaluation.metrics.local_realism``)
  against the validation volumes; the whole-volume figure above rewards blur on cine phantoms
  (a blotchy DiT scored 0.80 where a U-Net drawing clean hearts scored 0.52), this one does not.

Rows are the decoded images in [0, 1] on the grid of ``medgen eval quality``'s realism
figure, band-passed like it (``evaluation.metrics.realism_row``), for the copy rate too:
fresh subjects share the layout of the training ones, their edges less so.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from medgen_rt import diffusion as D
from medgen_rt.evaluation.memorization import copy_null, copy_threshold, nearest_neighbours, nn_realism
from medgen_rt.evaluation.metrics import local_realism, mmd_rbf, patch_table, realism_grid, realism_row


def _unit(image: torch.Tensor) -> np.ndarray:
    return ((image[0].float().clamp(-1, 1) + 1) / 2).numpy()


def image_row(image: torch.Tensor) -> np.ndarray:
    """Decoded image (1, X, Y, Z[, T]) in [-1, 1] -> the row `medgen eval quality` compares
    volumes on (``evaluation.metrics.realism_row``: [0, 1], area-averaged to <= 64 per side,
    band-passed)."""
    v01 = _unit(image)
    return realism_row(v01, realism_grid(v01.shape))


class SampleMonitor:
    """Scores a few samples of a denoiser against decoded references; see the module docstring.

    task: a DenoiserTask (its train/val latent sets, diffusion settings, masks); vae: the
    VQ-GAN the latents came from. n_samples volumes are drawn at every call with seeds
    seed..seed+n-1 (the same each time, so the curve shows the model, not the noise).
    """

    def __init__(self, task, vae, n_samples: int = 8, steps: int = 8, n_train_refs: int = 48,
                 guidance: Optional[float] = None, seed: int = 1234):
        if n_samples < 2:
            raise ValueError("monitor: n_samples must be >= 2")
        if len(task.val_set) < 3:
            raise ValueError("monitor: needs at least 3 validation latents")
        self.task, self.vae = task, vae.eval()
        self.n, self.steps, self.guidance, self.seed = int(n_samples), int(steps), guidance, int(seed)
        self.sampler = "euler" if task.diffusion.objective == "flow" else "ddim"
        picks = np.linspace(0, len(task.train_set) - 1, min(n_train_refs, len(task.train_set))).round().astype(int)
        self.train_rows = np.stack([self._reference_row(task.train_set, int(i)) for i in np.unique(picks)])
        val_images = [self._reference_image(task.val_set, i) for i in range(len(task.val_set))]
        self.val_rows = np.stack([image_row(im) for im in val_images])
        self.val_patches = [patch_table(_unit(im), seed=i) for i, im in enumerate(val_images)]
        # new subjects searched against the training references, as the samples are
        self.threshold = copy_threshold(copy_null({"image": self.train_rows}, {"image": self.val_rows})["image"])
        # conditioning maps for control adapters: the validation subjects' maps, in turn
        self.masks = self.label_maps = None
        if task.conditional:
            self.label_maps = [task.val_set.load(i % len(task.val_set))["mask"] for i in range(self.n)]
            self.masks = [task.mask_tensor(m) for m in self.label_maps]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list:
        """Unscaled latents (B, C, ...) -> decoded images (C, ...) in [-1, 1], snapped to the
        codebook first as sampling does."""
        out = []
        for z in latents:
            z = self.vae.quantizer.lookup(z[None].to(self.task.device))[1]
            out.append(self.vae.decode(z)[0].float().cpu())
        return out

    def _reference_image(self, dataset, i: int) -> torch.Tensor:
        return self._decode(dataset.load(i)["latent"].float()[None])[0]

    def _reference_row(self, dataset, i: int) -> np.ndarray:
        return image_row(self._reference_image(dataset, i))

    @torch.no_grad()
    def sample_latents(self, model) -> torch.Tensor:
        """n latents (unscaled) from the model with the few-step sampler."""
        task = self.task
        was_training = model.training
        model.eval()
        shape = (self.n,) + tuple(task.train_set.latent_shape)
        noise = torch.cat([torch.randn((1,) + shape[1:], generator=torch.Generator().manual_seed(self.seed + i))
                           for i in range(self.n)]).to(task.device)
        cond = null = None
        if self.masks is not None:
            cond = torch.stack(self.masks).to(task.device)
            null = torch.zeros_like(cond)

        diff = task.diffusion
        z = D.sample(D.network_fn(model, task.conditional), shape, diff.schedule, sampler=self.sampler,
                     steps=self.steps, guidance_scale=self.guidance if task.conditional else None, cond=cond,
                     null_cond=null, noise=noise, device=task.device,
                     prediction_type=diff.prediction if diff.objective == "ddpm" else None)
        model.train(was_training)
        return z.float().cpu() / task.scale

    def evaluate(self, model) -> dict:
        """{realism, nn_r, copy_rate, mmd2, local_realism} of n fresh samples of `model`; for a CT control
        adapter also the mean blood and myocardium Dice against the conditioning maps
        (``evaluation.metrics.ct_mask_adherence``)."""
        images = self._decode(self.sample_latents(model))
        rows = np.stack([image_row(im) for im in images])
        real = nn_realism(rows, self.val_rows)
        _, r_train = nearest_neighbours(rows, self.train_rows)
        out = {"realism": real["ratio"], "nn_r": real["synthetic_median"],
               "copy_rate": float(np.mean(r_train > self.threshold)),
               "mmd2": mmd_rbf(rows, self.val_rows)["mmd2"],
               "local_realism": local_realism([patch_table(_unit(im), seed=i) for i, im in enumerate(images)],
                                              self.val_patches)["ratio"]}
        if self.label_maps is not None and self.task.model_info().get("modality") == "ct":
            from medgen_rt.data.preprocess import unit_to_ct
            from medgen_rt.evaluation.metrics import ct_mask_adherence

            dice = [ct_mask_adherence(unit_to_ct(im[0].clamp(-1, 1).numpy()), m.numpy())
                    for im, m in zip(images, self.label_maps)]
            for group in dice[0]:
                out[f"dice_{group}"] = float(np.nanmean([d[group] for d in dice]))
        return out


CURVES = (("sample_local_realism", "local realism (samples' patches vs held-out's own)", 1.0),
          ("sample_realism", "realism (samples' nearest-neighbour r / held-out's own)", 1.0),
          ("sample_copy_rate", "copy rate (share of samples above the copy threshold)", None))


def draw_curves(rows: list, path, size: tuple = (640, 220)):
    """quality.png: one panel per monitored figure against the training step, from metrics.csv rows."""
    from PIL import Image, ImageDraw

    from medgen_rt.evaluation.report import COLORS, _fmt, _font, save_png

    font = _font()
    panels = []
    for key, title, ref in CURVES:
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        img = Image.new("RGB", size, "white")
        d = ImageDraw.Draw(img)
        left, right, top, bottom = 56, 16, 24, 30
        pw, ph = size[0] - left - right, size[1] - top - bottom
        d.text((left, 6), title, fill="black", font=font)
        d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([ref] if ref is not None else [])
            x0, x1 = min(xs), max(max(xs), min(xs) + 1)
            y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

            def px(x, y):
                return left + (x - x0) / (x1 - x0) * pw, top + ph - (y - y0) / (y1 - y0) * ph

            if ref is not None:
                d.line([px(x0, ref), px(x1, ref)], fill=(150, 150, 150))
            d.line([px(x, y) for x, y in pts], fill=COLORS[0], width=2)
            for x, y in pts:
                cx, cy = px(x, y)
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=COLORS[0])
            for v in np.linspace(y0, y1, 5):
                d.text((4, px(x0, v)[1] - 6), _fmt(float(v)), fill="black", font=font)
            for v in np.linspace(x0, x1, 6):
                d.text((px(v, y0)[0] - 10, top + ph + 6), f"{v:.0f}", fill="black", font=font)
        else:
            d.text((left + 8, top + ph // 2), "not yet measured", fill="black", font=font)
        panels.append(img)
    out = Image.new("RGB", (size[0], size[1] * len(panels) + 14), "white")
    for i, p in enumerate(panels):
        out.paste(p, (0, i * size[1]))
    ImageDraw.Draw(out).text((size[0] // 2 - 40, out.size[1] - 14), "training step", fill="black", font=font)
    return save_png(out, path)
