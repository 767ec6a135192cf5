"""`medgen train distill`: a student of a rectified-flow DiT, U-Net or TGCA run that samples in a
few Euler steps. The student is the teacher's network (same architecture, initialised with
the teacher's weights; for TGCA the whole model, base included, is trained), so the run
folder samples and exports like any other; model.json adds distilled_from, student_steps,
supported_steps and default_steps.

Method: endpoint distillation of the teacher's Euler ODE (consistency-style). For a training
latent x0, noise z and a time t on the Euler grid of a supported step count (t = k/K,
K = 1 .. student_steps), x_t = (1 - t) x0 + t z lies on the teacher's marginal at t (the
flow ODE carries the marginals of this path), and the teacher integrates from x_t to t = 0
with Euler steps of at most 1/teacher_steps, under no_grad, to its sample x0_T(x_t). The
student's velocity is trained towards (x_t - x0_T) / t: one Euler step from t then lands on
the teacher's sample, and K steps are the deterministic multistep consistency sampler (each
step moves x_t along the straight line towards the current x0 estimate).

Why this one: the target depends on (x_t, t) only, not on the step size, so one network with
no step-size input serves every step count it was trained on (the exporter, the ONNX engine
and the schedulers stay as they are). Progressive distillation (one Euler step over [t, t-2h]
matching two teacher steps) needs log2(N/K) rounds with a new teacher each and its student
fits one step count; a segment target [t, t - 1/K] contradicts itself between step counts at
shared grid points (t = 1 starts every grid). The price is up to teacher_steps teacher calls
per training sample, without gradients.

Guidance (TGCA teachers, optional): with `guidance` s each teacher step uses
uncond + s (cond - uncond), the null condition being the all-zero map, so the student sampled
without --guidance draws the guided teacher's samples at one network call per step instead of
two. Maps are dropped (zeroed) per sample at the adapter's condition_dropout_prob and the
teacher then follows its null branch, so `--unconditional` keeps working on the student.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import yaml

from medgen_rt import diffusion as D
from medgen_rt.train.config import load_config, preset_names
from medgen_rt.train.latents import per_sample_generator
from medgen_rt.train.tasks import DenoiserTask

SECTION_KEYS = ("student_steps", "teacher_steps", "guidance", "train")
DEFAULTS = {"student_steps": 4, "teacher_steps": 16, "guidance": None}
MAX_STUDENT_STEPS = 8


def resolve_teacher(arg: str) -> tuple:
    """(teacher run folder, its VQ-GAN folder, model info) for --teacher: a run folder or an
    embedded model name, as `medgen sample --model` takes them (an embedded name gives the
    teacher network even where the model ships a student). Errors name --teacher."""
    from medgen_rt.sampling.api import embedded_name, resolve_model  # lazy: sampling's model lookup, no import cycle
    from medgen_rt.io.run_folder import read_model_info

    try:
        # an embedded name: its teacher, never a student of the student it may ship; a folder as it is
        teacher, vae = resolve_model(arg, teacher=embedded_name(arg) is not None)
        info = read_model_info(teacher)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--teacher {arg}: no model to distil ({exc})") from None
    kind, objective = info.get("kind"), (info.get("diffusion") or {}).get("objective")
    if kind not in ("dit", "unet", "tgca") or objective != "flow":
        raise ValueError(f"--teacher {arg}: distillation needs a rectified-flow DiT, U-Net or TGCA run (diffusion objective "
                         f"flow, Euler sampling); {teacher} is a {kind} run with objective {objective!r}")
    if "distilled_from" in info:
        raise ValueError(f"--teacher {arg}: this run is itself a distilled student (of "
                         f"{info['distilled_from'].get('run')}); distil from its teacher")
    return teacher, vae, info


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def distill_config(args) -> dict:
    """The run's config with its distill section resolved (student_steps, teacher_steps, guidance
    from the command line, the section or the defaults), so that config.yaml records them.
    Without --config: the preset the teacher was trained with (its distill section as shipped
    now), else the teacher's recorded config. Without --latents: the teacher's training latents
    when its config.yaml names a folder that exists."""
    teacher, _, info = resolve_teacher(args.teacher)
    path = teacher / "config.yaml"
    recorded = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    if args.config:
        cfg, _ = load_config(args.config)
    elif (recorded.get("config") or {}).get("name") in preset_names():
        cfg, _ = load_config(recorded["config"]["name"])
    else:
        cfg = dict(recorded.get("config") or {})
    cfg.setdefault("modality", info.get("modality"))
    latents = (recorded.get("command") or {}).get("latents")
    if not args.latents and latents and Path(latents).is_dir():
        args.latents = latents
    where = f"config {args.config or str(path)!r}.distill"
    section = dict(cfg.get("distill") or {})
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {list(SECTION_KEYS)}")
    for key, default in DEFAULTS.items():
        given = getattr(args, key, None)
        section[key] = given if given is not None else section.get(key, default)
    k, n, s = section["student_steps"], section["teacher_steps"], section["guidance"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_STUDENT_STEPS:
        raise ValueError(f"{where}: student_steps (--student-steps) must be 1 .. {MAX_STUDENT_STEPS}, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= k:
        raise ValueError(f"{where}: teacher_steps (--teacher-steps) must be an integer above student_steps {k}, "
                         f"got {n!r}")
    if s is not None and (info["kind"] != "tgca" or isinstance(s, bool) or not isinstance(s, (int, float))
                          or not math.isfinite(s)):
        raise ValueError(f"{where}: guidance (--guidance) is a number and only for mask-conditioned (tgca) "
                         f"teachers; this teacher is a {info['kind']} run")
    # the sample figures of validation use the student's own step count
    section["train"] = {"monitor_steps": k, **(section.get("train") or {})}
    cfg["distill"] = section
    # recorded in config.yaml (command), so that --resume can check it is the same teacher
    args.teacher = str(teacher)
    args.teacher_sha256 = file_sha256(_weights_file(teacher))
    _check_resume_teacher(args)
    return cfg


def _weights_file(run: Path) -> Path:
    from medgen_rt.io.run_folder import model_weights_path

    return model_weights_path(run)  # the file load_model reads (EMA when present)


def _check_resume_teacher(args) -> None:
    """--resume with another teacher than the run started with (weights differ) is refused."""
    path = Path(args.out) / "config.yaml"
    if not (args.resume and path.is_file()):
        return
    recorded = ((yaml.safe_load(path.read_text()) or {}).get("command") or {}).get("teacher_sha256")
    if recorded and recorded != args.teacher_sha256:
        raise ValueError(f"--teacher {args.teacher}: its weights differ from those of the teacher this run "
                         f"started with (sha256 {recorded[:12]}...); resume with that teacher or choose another --out")


def student_info(teacher: Path, vae: Path, info: dict, section: dict, sha256: str) -> dict:
    """model.json of the student: the teacher's, with the VQ-GAN path made absolute (the student
    lives elsewhere) and what it was distilled from and for."""
    k = section["student_steps"]
    out = {key: v for key, v in info.items() if key != "selected"}
    out.update({"vae_run": str(vae.resolve()),
                "distilled_from": {"run": str(teacher.resolve()), "kind": info["kind"],
                                   "weights": _weights_file(teacher).name, "sha256": sha256},
                "student_steps": k, "supported_steps": list(range(1, k + 1)), "default_steps": k,
                "distillation": {"method": "teacher ODE endpoint (consistency-style), Euler",
                                 "teacher_steps": section["teacher_steps"], "guidance": section["guidance"]}})
    return out


class _MemoEmbedder(torch.nn.Module):
    """The frozen teacher's mask embedding depends on the map alone, not on x or t: computed once
    per map batch instead of at each of the teacher's Euler steps (at 64x64x32 maps the mask encoder
    made up most of a TGCA distillation step). Exact: the same map gives the same embedding."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.key, self.value = inner, None, None

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if self.key is None or self.key.shape != mask.shape or not torch.equal(self.key, mask):
            self.key, self.value = mask, self.inner(mask)
        return self.value


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x)


class DistillTask(DenoiserTask):
    """The student (self.model) against a frozen teacher; batches carry the teacher's targets.
    Everything else (checkpoints, EMA, resume, energy, metrics, sample figures) is the Trainer's."""

    name = "distill"

    def __init__(self, student, teacher, train, val, diffusion, device, info: dict, section: dict,
                 conditional: bool = False, mask_labels=None, dropout: float = 0.0, scale: float = 1.0):
        super().__init__(student, train, val, diffusion, device, info, conditional, mask_labels)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        if hasattr(teacher, "condition_embedder"):
            teacher.condition_embedder = _MemoEmbedder(teacher.condition_embedder)
        self.scale = scale  # the teacher's latent scale, which sampling the student uses
        self.student_steps = section["student_steps"]
        self.teacher_steps = section["teacher_steps"]
        self.guidance = section["guidance"]
        self.dropout = dropout
        self._val = None  # fixed validation noise, maps and the teacher's samples from them

    def velocity(self, net, x, t, mask, guidance=None) -> torch.Tensor:
        """net's velocity at continuous times t (B,), guided when asked (null = all-zero map)."""
        tm = D.flow_model_timesteps(t)
        if mask is None:
            return net(x, tm)
        return D.guided_model_output(lambda x_, t_, c: net(x_, t_, c), x, tm, mask, torch.zeros_like(mask), guidance)

    @torch.no_grad()
    def teacher_sample(self, x, t, mask) -> torch.Tensor:
        """The teacher's Euler integration from x at times t (B,) to 0, in ceil(t * teacher_steps)
        equal steps per sample; each step runs only the rows that still have steps to go."""
        n = torch.ceil(t * self.teacher_steps - 1e-4).clamp(min=1)
        h = t / n
        x = x.clone()
        for j in range(int(n.max())):
            rows = torch.nonzero(j < n).squeeze(1)
            xr = x[rows]
            v = self.velocity(self.teacher, xr, t[rows] - j * h[rows], None if mask is None else mask[rows],
                              self.guidance)
            x[rows] = xr - _per_sample(h[rows], xr) * v.float()
        return x

    def _grid_time(self, g: torch.Generator) -> float:
        """t = k/K with K uniform in 1 .. student_steps and k in 1 .. K: the points the student's
        samplers visit; t = 1, where every sample starts, is drawn most."""
        k_steps = int(torch.randint(1, self.student_steps + 1, (), generator=g))
        return int(torch.randint(1, k_steps + 1, (), generator=g)) / k_steps

    def make_batch(self, indices, positions, step, seed) -> dict:
        items = [self._item(self.train_set, i) for i in indices]
        x0 = torch.stack([x for x, _ in items]).to(self.device)
        gens = [per_sample_generator(seed, step, p) for p in positions]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device)
        t = torch.tensor([self._grid_time(g) for g in gens], device=self.device)
        mask = None
        if self.conditional:
            keep = torch.tensor([float(torch.rand((), generator=g)) >= self.dropout for g in gens])
            mask = torch.stack([m for _, m in items]).to(self.device) * _per_sample(keep, x0).to(self.device)
        x_t, _ = D.flow_training_pair(x0, noise, t)
        target = (x_t - self.teacher_sample(x_t, t, mask)) / _per_sample(t, x_t)
        return {"x_t": x_t, "t": D.flow_model_timesteps(t), "target": target, "mask": mask}

    @torch.no_grad()
    def validate(self) -> dict:
        """MSE of the student's samples at 1 and student_steps Euler steps (the sampler of `medgen
        sample`) against the teacher's teacher_steps-step samples from the same fixed noise (and
        the validation maps): comparable across steps and runs."""
        if self._val is None:
            count = min(len(self.val_set), 8)
            noise = torch.stack([torch.randn(self.val_set.latent_shape, generator=per_sample_generator(12345, i, 0, 2))
                                 for i in range(count)]).to(self.device)
            masks = torch.stack([self._item(self.val_set, i)[1] for i in range(count)]).to(self.device) \
                if self.conditional else None
            self._val = (noise, masks, self.teacher_sample(noise, torch.ones(count, device=self.device), masks))
        noise, masks, reference = self._val
        was_training = self.model.training
        self.model.eval()
        out = {}
        for k in sorted({1, self.student_steps}):
            z = D.sample(D.network_fn(self.model, self.conditional), noise.shape, sampler="euler", steps=k,
                         noise=noise, cond=masks)
            out[f"mse_{k}step"] = float(((z - reference) ** 2).mean())
        self.model.train(was_training)
        return out


def build_distill_task(args, section: dict, latent_sets, device) -> DistillTask:
    """latent_sets(require_masks) -> (train, val) latent sets (medgen_rt.train.run)."""
    from medgen_rt.models import load_model
    from medgen_rt.train.tasks import DiffusionSettings

    teacher_dir, vae_dir, info = resolve_teacher(args.teacher)
    conditional = info["kind"] == "tgca"
    train, val = latent_sets(conditional)
    if tuple(train.latent_shape) != tuple(info["latent_shape"]):
        raise ValueError(f"--latents {args.latents}: latents of shape {tuple(train.latent_shape)}, but the teacher "
                         f"generates {tuple(info['latent_shape'])}")
    teacher, _ = load_model(teacher_dir)
    student, _ = load_model(teacher_dir)
    student.requires_grad_(True)  # TGCA: the whole model, base included, learns the few-step velocity
    dropout = float(getattr(student, "condition_dropout_prob", 0.0))
    if conditional:
        student.condition_dropout_prob = 0.0  # dropped per sample in make_batch, for teacher and student alike
    model_info = student_info(teacher_dir, vae_dir, info, section, args.teacher_sha256)
    return DistillTask(student, teacher, train, val, DiffusionSettings(**info["diffusion"]), device, model_info,
                       section, conditional=conditional, mask_labels=info.get("mask_labels"), dropout=dropout,
                       scale=float(info["scale_factor"]))
