"""Copy detection (Dar et al.): which synthetic volumes copy a training volume, and which
training volumes the model memorised.

With embeddings from the self-supervised encoder (:mod:`.encoder`):

* similarity = Pearson correlation between two embedding vectors;
* threshold = the 95th percentile, over the training volumes, of each one's correlation
  with its nearest validation volume (new subjects of the same population: about 5% of
  them land above it by construction);
* a synthetic volume is a **copy** when its nearest training volume correlates above the
  threshold; a training volume is **memorised** when its nearest synthetic volume does.

Nearest neighbours are computed in chunks of query rows, so a large set never needs the
whole N x M correlation matrix in memory.
"""
from __future__ import annotations

import logging

import numpy as np

from .metrics import describe

__all__ = ["pearson_rows", "nearest_neighbours", "copy_threshold", "nn_realism", "screen_embeddings", "screen_sets"]

PERCENTILE = 95.0
log = logging.getLogger(__name__)


def pearson_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm: then ``a @ b.T`` is the Pearson correlation
    of every pair of rows (a constant row correlates 0 with everything)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings: expected (N, D), got shape {x.shape}")
    c = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(c, axis=1, keepdims=True)
    return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, chunk: int = 4096,
                       exclude_self: bool = False) -> tuple:
    """For every query row the reference row with the highest Pearson correlation.

    query (N, D), reference (M, D) raw embeddings. Returns (index (N,) int64, r (N,)
    float64). Computed ``chunk`` query rows at a time. ``exclude_self``: query and
    reference are the same set; a row is not its own neighbour.
    """
    q, ref = pearson_rows(query), pearson_rows(reference)
    if ref.shape[0] == 0:
        raise ValueError("reference: empty set")
    if exclude_self and ref.shape[0] < 2:
        raise ValueError("reference: need two volumes to find a neighbour other than itself")
    idx = np.empty(q.shape[0], dtype=np.int64)
    best = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], max(1, int(chunk))):
        r = q[start:start + chunk] @ ref.T
        if exclude_self:
            rows = np.arange(r.shape[0])
            r[rows, rows + start] = -np.inf
        idx[start:start + r.shape[0]] = r.argmax(axis=1)
        best[start:start + r.shape[0]] = r.max(axis=1)
    return idx, np.clip(best, -1.0, 1.0)


def copy_threshold(train_to_val_r: np.ndarray, percentile: float = PERCENTILE) -> float:
    """The percentile (linear interpolation, numpy's default) of the training volumes'
    correlations with their nearest validation volume."""
    r = np.asarray(train_to_val_r, dtype=np.float64)
    if r.size == 0:
        raise ValueError("train_to_val_r: empty")
    return float(np.percentile(r, percentile))


def nn_realism(synthetic: np.ndarray, real: np.ndarray) -> dict:
    """Nearest-neighbour realism of a synthetic set against a real one (rows = volumes).

    Each synthetic row's best Pearson r with the real rows, against each real row's best
    r with the *other* real rows (leave one out): a sample that looks like a member of
    the population sits as close to it as a new member does. ``ratio`` = median over
    the synthetic rows / median over the real rows: about 1 for a model whose samples
    are as close to the population as new subjects, near 0 for noise or blotches, and can
    exceed 1 for copies (which the copy screen catches). Averages are not caught: the
    population mean correlates with every member more than members do with each other
    (phantoms: ratio 1.03, Gaussian-blurred by 2 voxels still 0.96-1.0), so read it
    together with a diversity measure.
    """
    _, syn_r = nearest_neighbours(synthetic, real)
    _, real_r = nearest_neighbours(real, real, exclude_self=True)
    syn_med, real_med = float(np.median(syn_r)), float(np.median(real_r))
    return {"synthetic_nn_r": syn_r, "real_nn_r": real_r, "synthetic_median": syn_med, "real_median": real_med,
            "ratio": syn_med / real_med if real_med > 0 else float("nan")}


def screen_embeddings(train: np.ndarray, val: np.ndarray, synthetic: np.ndarray,
                      percentile: float = PERCENTILE, chunk: int = 4096) -> dict:
    """The copy-detection numbers from three embedding matrices (rows = volumes).

    Returns dict(threshold, copy_share, memorized_share, n_copies, n_memorized, and per
    volume: train_val (nearest val index, r), synthetic_train (nearest train index, r,
    is_copy), train_synthetic (nearest synthetic index, r, is_memorized)).
    """
    tv_idx, tv_r = nearest_neighbours(train, val, chunk)
    thr = copy_threshold(tv_r, percentile)
    st_idx, st_r = nearest_neighbours(synthetic, train, chunk)
    ts_idx, ts_r = nearest_neighbours(train, synthetic, chunk)
    is_copy = st_r > thr
    is_mem = ts_r > thr
    return {
        "threshold": thr,
        "percentile": float(percentile),
        "n_copies": int(is_copy.sum()),
        "copy_share": float(is_copy.mean()),
        "n_memorized": int(is_mem.sum()),
        "memorized_share": float(is_mem.mean()),
        "train_val": (tv_idx, tv_r),
        "synthetic_train": (st_idx, st_r, is_copy),
        "train_synthetic": (ts_idx, ts_r, is_mem),
    }


def screen_sets(train_set, val_set, synthetic_set, encoder=None, cfg=None, quiet: bool = True,
                chunk: int = 4096, percentile: float = PERCENTILE, batch_size: int = 8, device="cpu") -> dict:
    """Train (or use) the encoder, embed the three sets and screen the synthetic one.

    encoder: a trained CopyEncoder, or None to train one on ``train_set`` with ``cfg``.
    Returns the report dict (JSON-ready); ``"_model"`` holds the encoder and
    ``"_embeddings"`` the three embedding matrices (both dropped from report.json).
    """
    from . import encoder as enc
    from .datasets import EvalInputError, check_compatible

    check_compatible(train_set, val_set, synthetic_set)
    trained = encoder is None
    want = "cine" if train_set.is_cine else "volume"
    if encoder is None:
        cfg = cfg or enc.EncoderConfig()
        cfg.kind, cfg.modality = want, train_set.modality
        if len(train_set) < 2:
            raise EvalInputError(f"--train: need at least 2 volumes to train the encoder, found {len(train_set)}")
        inputs = enc.load_inputs(train_set, cfg, quiet, "read --train")
        encoder = enc.train_encoder(inputs, cfg, quiet=quiet, device=device, log=None if quiet else log.info)
        e_train = enc.embed_inputs(encoder, inputs)
        del inputs
    else:
        cfg = encoder.cfg
        if cfg.kind != want or cfg.modality != train_set.modality:
            raise EvalInputError(f"--encoder: trained on {cfg.modality.upper()} {cfg.kind} inputs but --train holds "
                                 f"{train_set.modality.upper()} {want} inputs")
        e_train = enc.embed_set(encoder, train_set, batch_size, quiet)
    e_val = enc.embed_set(encoder, val_set, batch_size, quiet)
    e_syn = enc.embed_set(encoder, synthetic_set, batch_size, quiet)
    s = screen_embeddings(e_train, e_val, e_syn, percentile, chunk)
    tn, vn, sn = train_set.names, val_set.names, synthetic_set.names
    tv_idx, tv_r = s["train_val"]
    st_idx, st_r, is_copy = s["synthetic_train"]
    ts_idx, ts_r, is_mem = s["train_synthetic"]
    size = list(cfg.size)
    if cfg.kind == "volume":
        representation = ("3D volume in [-1, 1] (" + ("CT: [-1000, 1000] HU" if cfg.modality == "ct" else
                          "MR: min-max") + f"), one channel, resampled to {size}")
    else:
        representation = (f"cine in [-1, 1] (min-max over the whole cine); frames as channels: {cfg.n_frames} "
                          f"frames evenly spaced over the cycle from the first stored frame, each resampled to {size}")
    notes = []
    if not 0.5 <= len(val_set) / len(train_set) <= 2.0:
        notes.append(f"--val has {len(val_set)} volumes and --train {len(train_set)}: the threshold is calibrated for "
                     "sets of about equal size (the nearest of more volumes correlates higher), so expect more or "
                     "fewer than 5% of new subjects above it")
    if len(train_set) < 20:
        notes.append(f"only {len(train_set)} training volumes: the 95th percentile of so few correlations is a rough "
                     "estimate")
    return {
        "kind": "memorization",
        "notes": notes,
        "method": "Dar et al.: self-supervised NT-Xent encoder, Pearson correlation between embeddings",
        "threshold": s["threshold"],
        "threshold_rule": (f"{percentile:g}th percentile (linear interpolation) of each training volume's Pearson "
                           "correlation with its nearest validation volume"),
        "copy_share": s["copy_share"],
        "n_copies": s["n_copies"],
        "memorized_share": s["memorized_share"],
        "n_memorized": s["n_memorized"],
        "sets": {k: {"folder": str(x.root), "layout": x.layout, "n": len(x), "modality": x.modality,
                     "cine": x.is_cine} for k, x in (("train", train_set), ("val", val_set),
                                                    ("synthetic", synthetic_set))},
        "encoder": {"trained_here": trained, "representation": representation,
                    "architecture": (f"4 MONAI Convolution stages (3^3 conv, batch norm, ReLU; widths "
                                     f"{list(cfg.channels)}) with 2x average pooling between them; global "
                                     f"averages of all stages -> projection head -> {cfg.proj_dim}-d embedding, "
                                     f"averaged over in-plane shifts of the input by up to {cfg.tta_shift} voxel(s)"),
                    "loss": f"NT-Xent (monai.losses.ContrastiveLoss, temperature {cfg.temperature})",
                    "positives": (f"a volume and its augmented version: flips along X and Y, rotation <= "
                                  f"{cfg.aug_rotate_deg:g} deg, scale +-{cfg.aug_scale:g}, shift <= {cfg.aug_shift:g} "
                                  f"of the grid, Gaussian noise std {cfg.aug_noise:g} on half of them"),
                    "config": cfg.to_dict()},
        "distributions": {"train_to_nearest_val": describe(tv_r), "synthetic_to_nearest_train": describe(st_r),
                          "train_to_nearest_synthetic": describe(ts_r)},
        "synthetic": [{"name": sn[i], "nearest_train": tn[int(st_idx[i])], "r": float(st_r[i]),
                       "is_copy": bool(is_copy[i])} for i in range(len(sn))],
        "train": [{"name": tn[i], "nearest_synthetic": sn[int(ts_idx[i])], "r": float(ts_r[i]),
                   "is_memorized": bool(is_mem[i]), "nearest_val": vn[int(tv_idx[i])], "r_val": float(tv_r[i])}
                  for i in range(len(tn))],
        "_model": encoder,
        "_embeddings": {"train": e_train, "val": e_val, "synthetic": e_syn},
    }
