"""The training loop shared by every task (VQ-GAN, DiT, control adapters, U-Net).

Reproducibility is by construction, so that `--resume` continues exactly and N
processes train like one:
* the global batch at step s is fixed by (seed, epoch permutation, s), whatever
  the number of processes; rank r takes positions r, r+N, ... of it;
* per-sample randomness (crops, noise, timesteps) comes from generators seeded
  by (seed, step, position in the global batch), never from shared state;
* what does use the global RNG (dropout) is saved and restored per rank.
Gradients are averaged over ranks after each backward (data parallel).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from medgen_rt.io.atomic import atomic_path
from medgen_rt.io.sidecar import write_json_atomic
from medgen_rt.runtime.energy import EnergyMeter
from medgen_rt.train import checkpoint as ckpt
from medgen_rt.train.distributed import DistInfo, average_gradients, barrier

log = logging.getLogger("medgen_rt.train")


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 2  # global, over all processes
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | exponential | constant
    min_lr_ratio: float = 0.01  # cosine floor
    lr_gamma: float = 0.999  # exponential decay per step
    grad_clip: Optional[float] = 1.0
    ema_decay: Optional[float] = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    val_every: int = 100
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    # denoisers: at every validation, sample this many volumes with monitor_steps steps and log
    # realism and copy rate (medgen_rt.train.monitor); 0 turns it off
    monitor_samples: int = 0
    monitor_steps: int = 8
    # keep the EMA weights of the best validation (realism closest to 1; mask-conditioned models:
    # highest mean Dice) among those whose copy rate is at most this (run_dir/best/, a model
    # folder of its own); None: only the last
    keep_best_copy_rate: Optional[float] = None

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown training setting(s) {unknown}; known: {sorted(known)}")
        out = cls(**d)
        out.betas = tuple(out.betas)
        out.check(where)
        return out

    def check(self, where: str) -> None:
        """Refuse settings that would train nothing, divide by zero mid-run or write an untrained
        "finished" model; run again after command-line overrides (medgen_rt.train.run)."""
        def number(name, ok, what, kinds=(int,)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
                raise ValueError(f"{where}: {name} must be {what}, got {value!r}")

        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "monitor_steps"):
            number(name, lambda v: v >= 1, "a positive integer")
        for name in ("val_every", "warmup_steps", "keep_checkpoints", "seed", "monitor_samples"):
            number(name, lambda v: v >= 0, "a non-negative integer")
        number("lr", lambda v: 0 < v < math.inf, "a positive number", (int, float))
        if self.lr_schedule not in ("cosine", "exponential", "constant"):
            raise ValueError(f"{where}: lr_schedule must be cosine, exponential or constant, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"{where}: precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_factor(step: int, s: TrainSettings) -> float:
    """Multiplier of the base learning rate at a 0-based step: linear warm-up, then decay."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.lr_schedule == "constant":
        return 1.0
    k = step - s.warmup_steps
    if s.lr_schedule == "exponential":
        return s.lr_gamma ** k
    span = max(1, s.steps - s.warmup_steps)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(k, span) / span))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay for the update after 0-based `step`, warmed up as diffusers' EMAModel does:
    min(decay, (1 + step) / (10 + step)). Without the warm-up a decay of 0.999 still holds
    0.999^2500 = 8% of the random initial weights after 2,500 steps (zero-initialised output
    layers included), and a short CPU run ships a shrunken, noisy average."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def global_batch_indices(n: int, batch: int, seed: int, step: int) -> list:
    """Dataset indices of the global batch at `step` (same for any number of processes)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    if n < batch:  # tiny sets: cycle through the permutation
        return [int(perm[(k * batch + i) % n]) for i in range(batch)]
    return [int(i) for i in perm[k * batch:(k + 1) * batch]]


class StopRequested(Exception):
    pass


def _best_score(figures: dict) -> float:
    """Higher is better. Mask-conditioned models: the mean Dice against their maps (following
    the map is their job; realism stays near 1 throughout). Others: local realism (else the
    whole-volume realism, which rewards blur) closest to 1, not highest, since copies and
    population averages score at or above 1."""
    dice = [v for k, v in figures.items() if k.startswith("dice_")]
    if dice:
        return float(np.mean(dice)) if all(math.isfinite(v) for v in dice) else -math.inf
    local = figures.get("local_realism")  # None or nan where nothing was measured
    if local is None or not math.isfinite(local):
        local = figures.get("realism", math.inf)
    return -abs(1 - local)


class Trainer:
    """Runs a task (see medgen_rt.train.tasks) for settings.steps steps in run_dir."""

    def __init__(self, task, settings: TrainSettings, run_dir: Path, dist: DistInfo, resume: bool = False,
                 quiet: bool = False, energy: bool = True, country: Optional[str] = None, config_text: str = "",
                 monitor=None):
        self.task = task
        self.monitor = monitor  # SampleMonitor or None
        self.s = settings
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.quiet = quiet or not dist.is_main
        self.energy_enabled = energy
        self.country = country
        self.config_text = config_text
        if settings.batch_size % dist.world_size:
            raise ValueError(f"batch_size {settings.batch_size} must be divisible by the {dist.world_size} processes")
        self.optimizers = {}
        for name, params in task.parameter_groups().items():
            params = [p for p in params if p.requires_grad]
            if not params:
                raise ValueError(f"{task.name}: optimizer group {name!r} has no trainable parameters")
            lr = task.learning_rates().get(name, settings.lr)
            self.optimizers[name] = torch.optim.AdamW(params, lr=lr, betas=settings.betas,
                                                      weight_decay=settings.weight_decay)
        self.base_lrs = {n: [g["lr"] for g in o.param_groups] for n, o in self.optimizers.items()}
        self.ema = None
        if settings.ema_decay:  # trainable parameters only; buffers and frozen weights come from the live model
            self.ema = {m: {k: p.detach().clone().float() for k, p in mod.named_parameters() if p.requires_grad}
                        for m, mod in task.modules().items()}
        self.step = 0
        self._stop = False
        self._metric_columns = None  # header of metrics.csv, read once
        self._seconds_before = 0.0  # training seconds of earlier sessions (metrics.csv continues from them)
        if resume:
            self._resume()
        elif dist.is_main:
            self._start_fresh()
        barrier(dist)

    # ---- run folder ----------------------------------------------------------------------------
    def _start_fresh(self) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if (self.run_dir / "config.yaml").is_file() and ckpt.latest_checkpoint(self.run_dir) is None:
                raise FileExistsError(f"{self.run_dir}: this run stopped before its first checkpoint; pass --resume "
                                      "to start it again from step 0, or choose another --out")
            raise FileExistsError(f"{self.run_dir}: run folder exists and is not empty; "
                                  "pass --resume to continue it or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        with atomic_path(self.run_dir / "config.yaml") as tmp:
            tmp.write_text(self.config_text)

    def _restart(self) -> None:
        """--resume on a run killed (or stopped by a full disk) before its first checkpoint: there is
        nothing to continue, so the run starts again from step 0 in the same folder. Refusing would
        leave a folder that neither starts anew nor resumes; nothing is lost, as no weights exist.
        What the dead session logged (metrics, figures, a best model) is removed, so that it is not
        mixed with the new one; energy.json keeps its sessions (that energy was spent)."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not (self.run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--out {self.run_dir}: no checkpoint to resume from, and not a medgen run "
                                    "folder (no config.yaml); choose another --out")
        log.info("%s: no checkpoint to resume from (the run stopped before its first one): starting from step 0",
                 self.run_dir)
        for name in ("metrics.csv", "quality.png"):
            (self.run_dir / name).unlink(missing_ok=True)
        for name in ("best", "checkpoints"):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            if self.dist.is_main:
                self._restart()
            return
        data = ckpt.read_checkpoint(path)
        for name, module in self.task.modules().items():
            module.load_state_dict(data["weights"][name])
        if self.ema is not None:
            if data["ema"] is None:
                raise ValueError(f"{path}: the run has EMA enabled but the checkpoint holds no EMA weights")
            self.ema = {m: {k: data["ema"][m][k].float() for k in keys} for m, keys in self.ema.items()}
        ts = data["trainer_state"]
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ts["optimizers"][name])
        rng = ts.get("rng", {}).get(str(self.dist.rank))
        if rng is not None:
            torch.set_rng_state(rng)
        self.step = int(data["state"]["step"])
        if self.dist.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed %s from %s (step %d)", self.run_dir, path.name, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Rows logged after the checkpoint were lost with the killed run: drop them."""
        path = self.run_dir / "metrics.csv"
        if not path.exists():
            return
        rows = list(csv.DictReader(path.open()))
        columns = list(rows[0].keys()) if rows else ["step"]
        kept = [r for r in rows if int(r["step"]) <= step]
        self._write_metrics(columns, kept)
        # the last row's, not the largest: runs written before seconds continued restart at 0 mid-file
        self._seconds_before = next((float(r["seconds"]) for r in reversed(kept) if r.get("seconds")), 0.0)

    def _write_metrics(self, columns: list, rows: list) -> None:
        with atomic_path(self.run_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self._metric_columns = columns

    def _log_metrics(self, row: dict) -> None:
        """Appends a row; a column seen for the first time (validation terms) rewrites the file."""
        path = self.run_dir / "metrics.csv"
        if self._metric_columns is None and path.exists():
            with path.open() as f:
                self._metric_columns = next(csv.reader(f))
        columns = self._metric_columns or ["step"]
        added = [k for k in sorted(row) if k not in columns]
        if added or not path.exists():
            rows = list(csv.DictReader(path.open())) if path.exists() else []
            self._write_metrics(columns + added, rows + [row])
        else:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(row)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _gather_rng(self) -> dict:
        state = torch.get_rng_state()
        if not self.dist.distributed:
            return {"0": state}
        import torch.distributed as tdist

        gathered = [torch.empty_like(state) for _ in range(self.dist.world_size)]
        tdist.all_gather(gathered, state)
        return {str(r): s for r, s in enumerate(gathered)}

    def _snapshot(self) -> tuple:
        """(weights, EMA weights or None) of every module, as CPU tensors."""
        weights = {m: ckpt.state_dict_tensors(mod) for m, mod in self.task.modules().items()}
        return weights, self._ema_tensors()

    def save_checkpoint(self, snapshot: Optional[tuple] = None) -> None:
        rng = self._gather_rng()  # a collective: every rank takes part
        if self.dist.is_main:
            weights, ema = snapshot or self._snapshot()
            trainer_state = {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                             "rng": rng}
            ckpt.write_checkpoint(self.run_dir, self.step, weights, ema, trainer_state,
                                  {"step": self.step, "task": self.task.name, "world_size": self.dist.world_size},
                                  keep=self.s.keep_checkpoints)
        barrier(self.dist)

    def _ema_tensors(self):
        if self.ema is None:
            return None
        out = {}
        for m, mod in self.task.modules().items():
            tensors = ckpt.state_dict_tensors(mod)  # buffers come from the live model
            for k, v in self.ema[m].items():
                tensors[k] = v.to(tensors[k].dtype).cpu().contiguous().clone()
            out[m] = tensors
        return out

    # ---- the loop ------------------------------------------------------------------------------
    def _autocast(self):
        use_bf16 = self.s.precision == "bf16" or (self.s.precision == "auto" and self.dist.device.type == "cuda")
        if use_bf16:
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.dist.device.type, enabled=False)

    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.s)
        for name, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[name]):
                group["lr"] = base * f
        return f * self.s.lr

    def _update_ema(self) -> None:
        d = ema_decay_at(self.step, self.s.ema_decay)
        with torch.no_grad():
            for m, mod in self.task.modules().items():
                params = dict(mod.named_parameters())
                for k, avg in self.ema[m].items():
                    avg.mul_(d).add_(params[k].detach().float(), alpha=1 - d)

    # ---- quality and copying while training ---------------------------------------------------
    def _swap_ema(self) -> None:
        """Exchange the live parameters with their EMA averages (twice = unchanged)."""
        with torch.no_grad():
            for m, mod in self.task.modules().items():
                params = dict(mod.named_parameters())
                for k, avg in self.ema[m].items():
                    live = params[k].detach().clone()
                    params[k].copy_(avg)
                    avg.copy_(live)

    def _monitor(self) -> dict:
        """Sample figures of the weights that ship (EMA when kept), as sample_* metrics."""
        if self.monitor is None:
            return {}
        use_ema = self.ema is not None
        if use_ema:
            self._swap_ema()
        try:
            figures = self.monitor.evaluate(self.task.modules()["model"])
            self._keep_best(figures)
        finally:
            if use_ema:
                self._swap_ema()
        return {f"sample_{k}": v for k, v in figures.items()}

    def _keep_best(self, figures: dict) -> None:
        """run_dir/best/: the best model (``_best_score``) under the copy-rate limit.
        Called with the EMA weights in place, so they are what is written."""
        limit = self.s.keep_best_copy_rate
        if limit is None or self.step == 0 or figures["copy_rate"] > limit or not math.isfinite(figures["realism"]):
            return
        best_dir = self.run_dir / "best"
        best_dir.mkdir(exist_ok=True)
        if (best_dir / "model.json").is_file():
            previous = json.loads((best_dir / "model.json").read_text()).get("selected", {})
            if _best_score(figures) < _best_score(previous):
                return
        info = {**self.task.model_info(),
                "selected": {"step": self.step, "copy_rate_limit": limit, **figures}}
        weights = {m: ckpt.state_dict_tensors(mod) for m, mod in self.task.modules().items()}
        ckpt.write_model_files(best_dir, weights, None, info)
        log.info("step %d: best so far (realism %.3f, copy rate %.2f) -> %s", self.step, figures["realism"],
                 figures["copy_rate"], best_dir)

    def _draw_curves(self) -> None:
        from medgen_rt.train.monitor import draw_curves

        path = self.run_dir / "metrics.csv"
        draw_curves(list(csv.DictReader(path.open())), self.run_dir / "quality.png")

    def _request_stop(self, signum, frame):
        # Ctrl-C and SIGTERM stop at the next step boundary (a KeyboardInterrupt raised
        # inside a file read or a kernel could surface as some other error); a second
        # Ctrl-C stops at once.
        if signum == signal.SIGINT and self._stop:
            raise KeyboardInterrupt
        self._stop = True

    def train_step(self) -> dict:
        indices = global_batch_indices(self.task.num_train(), self.s.batch_size, self.s.seed, self.step)
        positions = list(range(self.dist.rank, self.s.batch_size, self.dist.world_size))
        batch = self.task.make_batch([indices[p] for p in positions], positions, self.step, self.s.seed)
        lr = self._set_lr()
        logs = {"lr": lr}
        with self._autocast():
            losses, extra = self.task.losses(batch, self.step)
        logs.update(extra)
        # one optimizer after the other (generator, then discriminator for GANs)
        for i, (name, opt) in enumerate(self.optimizers.items()):
            loss = losses[name]
            opt.zero_grad(set_to_none=True)
            loss.backward(retain_graph=i < len(self.optimizers) - 1)
            params = [p for g in opt.param_groups for p in g["params"]]
            average_gradients(params, self.dist.world_size)
            if self.s.grad_clip:
                logs[f"grad_norm_{name}"] = float(torch.nn.utils.clip_grad_norm_(params, self.s.grad_clip))
            opt.step()
            logs[f"loss_{name}"] = float(loss.detach())
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return logs

    def fit(self) -> dict:
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        # Rank 0 meters for all: the whole machine when several processes share it.
        meter = EnergyMeter(country=self.country, enabled=self.energy_enabled and self.dist.is_main,
                            tracking_mode="machine" if self.dist.distributed else "process")
        bar = None
        if not self.quiet:
            from tqdm import tqdm

            bar = tqdm(total=self.s.steps, initial=self.step, desc=f"train {self.task.name}", unit="step",
                       dynamic_ncols=True)
        interrupted = False
        t0 = time.perf_counter()
        try:
            with meter.phase("train"):
                if self.step == 0 and self.s.val_every and self.dist.is_main:
                    # the untrained model's validation terms: the baseline progress is measured against
                    self._log_metrics({"step": 0, "seconds": 0.0,
                                       **{f"val_{k}": v for k, v in self.task.validate().items()},
                                       **self._monitor()})
                while self.step < self.s.steps:
                    if self._stop:
                        raise StopRequested()
                    logs = self.train_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
                    last = self.step == self.s.steps
                    validate = bool(self.s.val_every) and (self.step % self.s.val_every == 0 or last)
                    if self.dist.is_main and (validate or self.step % self.s.log_every == 0 or last):
                        seconds = self._seconds_before + time.perf_counter() - t0
                        row = {"step": self.step, "seconds": round(seconds, 3), **logs}
                        if validate:
                            val = {f"val_{k}": v for k, v in self.task.validate().items()}
                            val.update(self._monitor())
                            row.update(val)
                            if bar is not None:
                                bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in val.items()))
                        self._log_metrics(row)
                        if validate and self.monitor is not None:
                            self._draw_curves()
                    if self.step % self.s.checkpoint_every == 0 and self.step < self.s.steps:
                        self.save_checkpoint()
        except (KeyboardInterrupt, StopRequested):
            interrupted = True
            if bar is not None:
                bar.write(f"interrupted: saving a checkpoint at step {self.step}")
            self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not interrupted:
            snapshot = self._snapshot() if self.dist.is_main else None
            self.save_checkpoint(snapshot)
            if self.dist.is_main:
                ckpt.write_model_files(self.run_dir, *snapshot, self.task.model_info())
        if self.dist.is_main:
            self._write_energy(meter.report())
        barrier(self.dist)
        return {"step": self.step, "interrupted": interrupted}

    def _write_energy(self, report: dict) -> None:
        """Adds this session to the run's energy.json (a resumed run has several sessions)."""
        path = self.run_dir / "energy.json"
        total = json.loads(path.read_text()) if path.exists() else {"sessions": []}
        total["sessions"].append({**report, "ended_at_step": self.step, "processes": self.dist.world_size})
        metered = [s for s in total["sessions"] if s.get("kwh") is not None]
        total["country"] = report["country"]
        total["kwh"] = sum(s["kwh"] for s in metered) if metered else None
        total["kg_co2e"] = sum(s["kg_co2e"] for s in metered) if metered else None
        total["seconds"] = sum(s["seconds"] for s in total["sessions"])
        write_json_atomic(path, total)
