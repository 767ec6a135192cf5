"""Training tasks. A task owns its models and data and tells the loop
(medgen_rt.train.loop) what to optimise:

    modules()            {name: nn.Module} saved in checkpoints
    parameter_groups()   {optimizer name: params}, stepped in this order
    learning_rates()     {optimizer name: lr} overrides of the base lr
    num_train()          training items
    make_batch(indices, positions, step, seed)   tensors for this rank's share
    losses(batch, step)  ({optimizer name: loss}, {log name: float})
    validate()           {name: float} on held-out data, deterministic
    model_info()         what model.json records
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from medgen_rt import diffusion as D
from medgen_rt.train.latents import LatentSet, per_sample_generator


class DiffusionSettings:
    """The diffusion part of a config: objective, schedule, prediction, loss."""

    def __init__(self, objective: str = "ddpm", schedule: str = "cosine", timesteps: int = 300,
                 prediction: str = "v_prediction", loss: str = "smooth_l1", flow_timestep_sampling: str = "logit_normal",
                 flow_logit_mean: float = 0.0):
        """flow_logit_mean: centre of the logit-normal training times. 0 is the published
        setting; log(s) draws times as SD3's shift s does (more of them at high noise, where
        a large latent keeps most of its structure and the global layout is decided)."""
        if objective not in ("ddpm", "flow"):
            raise ValueError(f"diffusion.objective must be ddpm or flow, got {objective!r}")
        self.objective = objective
        self.schedule_kind = schedule
        self.timesteps = int(timesteps)
        self.prediction = prediction
        self.loss = loss
        self.flow_timestep_sampling = flow_timestep_sampling
        self.flow_logit_mean = float(flow_logit_mean)
        self.schedule = D.make_schedule(schedule, self.timesteps) if objective == "ddpm" else None

    def to_dict(self) -> dict:
        return {"objective": self.objective, "schedule": self.schedule_kind, "timesteps": self.timesteps,
                "prediction": self.prediction, "loss": self.loss,
                "flow_timestep_sampling": self.flow_timestep_sampling, "flow_logit_mean": self.flow_logit_mean}

    def noisy_pair(self, x0: torch.Tensor, gens: list, device) -> tuple:
        """(x_t, model timesteps, target) for a batch, with per-sample generators."""
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        if self.objective == "flow":
            t = torch.stack([D.sample_flow_timesteps(1, self.flow_timestep_sampling, logit_mean=self.flow_logit_mean,
                                                     generator=g)[0] for g in gens])
            t = t.to(device)
            x_t, target = D.flow_training_pair(x0, noise, t)
            return x_t, D.flow_model_timesteps(t), target
        t = torch.stack([torch.randint(0, self.timesteps, (), generator=g) for g in gens]).to(device)
        x_t = self.schedule.add_noise(x0, noise, t)
        return x_t, t, D.training_target(x0, noise, t, self.schedule, self.prediction)


class TrainingTask:
    """Defaults shared by the tasks; subclasses set self._info and the rest."""

    name = "task"
    _info: dict = {}

    def learning_rates(self) -> dict:
        return {}

    def model_info(self) -> dict:
        return self._info


class DenoiserTask(TrainingTask):
    """DiT or U-Net on cached latents; with masks for TGCA / ControlNet training.

    model(x_t, t) for unconditional denoisers, model(x_t, t, mask) for control
    adapters (conditional=True). Latents are multiplied by their scale factor.
    """

    @property
    def name(self) -> str:
        """The model kind (dit, unet, tgca, controlnet) for progress bars and checkpoint records."""
        return self._info.get("kind", "denoiser")

    def __init__(self, model: nn.Module, train: LatentSet, val: LatentSet, diffusion: DiffusionSettings,
                 device: torch.device, model_info: dict, conditional: bool = False,
                 mask_labels: Optional[list] = None, val_timesteps: int = 4):
        self.model = model.to(device)
        self.train_set, self.val_set = train, val
        self.diffusion = diffusion
        self.device = device
        self._info = model_info
        self.conditional = conditional
        self.mask_labels = mask_labels
        self.val_timesteps = val_timesteps
        self.scale = train.scale_factor

    def modules(self) -> dict:
        return {"model": self.model}

    def parameter_groups(self) -> dict:
        return {"model": list(self.model.parameters())}

    def num_train(self) -> int:
        return len(self.train_set)

    def _item(self, dataset: LatentSet, i: int) -> tuple:
        tensors = dataset.load(i)
        x0 = tensors["latent"].float() * self.scale
        mask = None
        if self.conditional:
            mask = self.mask_tensor(tensors["mask"])
        return x0, mask

    def mask_tensor(self, labels: torch.Tensor) -> torch.Tensor:
        """Stored label map (uint8, image resolution; `medgen encode` writes these) -> (K, ...) float one-hot."""
        return torch.stack([(labels == v) for v in self.mask_labels]).float()

    def make_batch(self, indices, positions, step, seed) -> dict:
        items = [self._item(self.train_set, i) for i in indices]
        x0 = torch.stack([x for x, _ in items]).to(self.device)
        gens = [per_sample_generator(seed, step, p) for p in positions]
        x_t, t, target = self.diffusion.noisy_pair(x0, gens, self.device)
        batch = {"x_t": x_t, "t": t, "target": target}
        if self.conditional:
            batch["mask"] = torch.stack([m for _, m in items]).to(self.device)
        return batch

    def _forward(self, batch) -> torch.Tensor:
        if self.conditional:
            return self.model(batch["x_t"], batch["t"], batch["mask"])
        return self.model(batch["x_t"], batch["t"])

    def losses(self, batch, step) -> tuple:
        out = self._forward(batch)
        loss = D.diffusion_loss(out.float(), batch["target"].float(), self.diffusion.loss)
        return {"model": loss}, {}

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss over the validation items at fixed timesteps and noise (comparable across steps)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for i in range(len(self.val_set)):
            x0, mask = self._item(self.val_set, i)
            x0 = x0[None].to(self.device)
            for k in range(self.val_timesteps):
                g = per_sample_generator(12345, i, k, stream=1)
                x_t, t, target = self._fixed_val_pair(x0, k, g)
                batch = {"x_t": x_t, "t": t, "mask": None if mask is None else mask[None].to(self.device)}
                out = self._forward(batch)
                total += float(D.diffusion_loss(out.float(), target.float(), self.diffusion.loss))
                count += 1
        self.model.train(was_training)
        return {"loss": total / max(count, 1)}

    def _fixed_val_pair(self, x0, k, g):
        """Timesteps spread evenly over the range, noise from a fixed generator."""
        noise = torch.randn(x0.shape[1:], generator=g)[None].to(self.device)
        frac = (k + 0.5) / self.val_timesteps
        if self.diffusion.objective == "flow":
            t = torch.tensor([frac], device=self.device)
            x_t, target = D.flow_training_pair(x0, noise, t)
            return x_t, D.flow_model_timesteps(t), target
        t = torch.tensor([int(frac * self.diffusion.timesteps)], device=self.device)
        x_t = self.diffusion.schedule.add_noise(x0, noise, t)
        return x_t, t, D.training_target(x0, noise, t, self.diffusion.schedule, self.diffusion.prediction)
