"""Copy detection (Dar et al.): which synthetic volumes copy a training volume, and which
training volumes the model memorised.

Two signals per volume, each compared by Pearson correlation with every training volume:

* **encoder**: the self-supervised NT-Xent embedding (:mod:`.encoder`, the published
  method). Its training views make it insensitive to what a copy goes through, shifts and
  deformations above all.
* **image**: the encoder's input grid itself (standardised, at most 32 voxels a side), each
  slice band-passed (in-plane difference of Gaussians, sigmas 1 and 3 voxels) and centred on
  the training volumes' mean. Centring leaves what sets a subject apart from the population,
  so in-place degradations (noise, blur, intensity drift, small deformations) keep a copy's r
  near 1 while new subjects fall well below; it needs no training, so it does not depend on
  how far the encoder got, but a shift of a voxel moves every edge and escapes it - which is
  what the encoder is for. Together they need a shorter encoder training than the encoder
  alone for the same recall (bench/copy_screen.py).

Threshold (the published rule's shape, for two signals): for each signal, the Fisher z of the
correlations of new subjects with the set they are searched against is standardised by that
signal's mean and std; a volume's **score** is the larger of its two standardised values, and
the threshold is the 95th percentile of those scores (estimated so that a new subject exceeds it
5% of the time, :func:`copy_threshold`). The new subjects must be searched against a set of
the size the screened volumes are searched against, since the best of more volumes correlates
higher: a synthetic volume is searched against the training set, so the copy threshold comes
from each validation volume's nearest training volume and each training volume's nearest
*other* training volume (:func:`copy_null`). The published rule (each training volume's
nearest validation volume) searched only the validation set: with 16 validation and 400
training cine phantoms it flagged 4 of 8 fresh phantoms as copies. Memorisation (a training
volume's nearest synthetic volume) keeps the published rule, whose search set - the
validation set - is about the synthetic set's size.
In r units each signal gets its own threshold, at the same number of standard
deviations above new subjects; a volume is a **copy** when either nearest-training correlation
exceeds its signal's threshold, and a training volume is **memorised** when either
nearest-synthetic one does. About 5% of new subjects land above it by construction, as with
one signal (with one signal the rule is exactly the published one).

Nearest neighbours are computed in chunks of query rows, so a large set never needs the
whole N x M correlation matrix in memory.
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import describe

__all__ = ["pearson_rows", "nearest_neighbours", "copy_threshold", "copy_null", "nn_realism", "screen_embeddings",
           "screen_signals", "image_rows", "screen_sets", "calibrate", "SIGNALS"]

PERCENTILE = 95.0
PERCENTILE_METHOD = "weibull"  # see copy_threshold
SIGNALS = ("encoder", "image")
# In-plane difference of Gaussians of the image signal, in encoder-grid voxels: below 1 voxel
# it would carry added noise, above 3 the layout every subject shares.
IMAGE_BAND_SIGMAS = (1.0, 3.0)


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
    """The percentile of the training volumes' correlations with their nearest validation
    volume, estimated as the (n + 1) p-th order statistic (interpolated; numpy's "weibull"), so
    that a new subject lands above the 95th percentile 5% of the time. numpy's default puts it
    at the (n - 1) p + 1-th, which a new subject exceeds 7% of the time with 40 volumes and 10%
    with 16."""
    r = np.asarray(train_to_val_r, dtype=np.float64)
    if r.size == 0:
        raise ValueError("train_to_val_r: empty")
    return float(np.percentile(r, percentile, method=PERCENTILE_METHOD))


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
    """The copy-detection numbers from one signal's three matrices (rows = volumes): the
    published rule. Returns dict(threshold, copy_share, memorized_share, n_copies,
    n_memorized, and per volume: train_val (nearest val index, r), synthetic_train (nearest
    train index, r, is_copy), train_synthetic (nearest synthetic index, r, is_memorized))."""
    s = screen_signals({"encoder": train}, {"encoder": val}, {"encoder": synthetic}, percentile, chunk)
    p = s["per_signal"]["encoder"]
    return {"threshold": s["thresholds"]["encoder"], "percentile": float(percentile),
            "n_copies": s["n_copies"], "copy_share": s["copy_share"], "n_memorized": s["n_memorized"],
            "memorized_share": s["memorized_share"], "train_val": p["train_val"],
            "synthetic_train": (*p["synthetic_train"], s["is_copy"]),
            "train_synthetic": (*p["train_synthetic"], s["is_memorized"])}


def _fisher(r) -> np.ndarray:
    return np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -1 + 1e-12, 1 - 1e-12))


class Rule:
    """The threshold rule of the module docstring, fitted on each signal's train -> nearest
    validation correlations {signal: (N,) r}. ``thresholds``: {signal: r threshold};
    ``score(r_by_signal)``: the combined score (standardised Fisher z, largest over signals)."""

    def __init__(self, train_val_r: dict, percentile: float = PERCENTILE):
        self.names = list(train_val_r)
        self.scale = {}
        for k, r in train_val_r.items():
            z = _fisher(r)
            self.scale[k] = (float(z.mean()), max(float(z.std()), 1e-6))
        self.train_scores = self.score(train_val_r)
        self.limit = copy_threshold(self.train_scores, percentile)
        if len(self.names) == 1:  # exactly the published rule: the percentile of the correlations
            k = self.names[0]
            self.thresholds = {k: copy_threshold(train_val_r[k], percentile)}
        else:
            self.thresholds = {k: float(np.tanh(m + self.limit * sd)) for k, (m, sd) in self.scale.items()}

    def standardised(self, r_by_signal: dict) -> np.ndarray:
        """(signals, N): each signal's Fisher z, standardised by its train -> val mean and std."""
        return np.stack([(_fisher(r_by_signal[k]) - m) / sd for k, (m, sd) in self.scale.items()])

    def score(self, r_by_signal: dict) -> np.ndarray:
        return self.standardised(r_by_signal).max(axis=0)

    def flags(self, r_by_signal: dict) -> dict:
        """{signal: bool array}: which correlations exceed their signal's threshold."""
        return {k: np.asarray(r_by_signal[k]) > t for k, t in self.thresholds.items()}


def copy_null(train: dict, val: dict, chunk: int = 4096) -> dict:
    """{signal: r} of new subjects searched against the training set, the reference of the copy
    threshold: each validation volume's best r with a training volume, then each training
    volume's best r with another training volume (a new subject to the rest)."""
    return {k: np.concatenate([nearest_neighbours(val[k], train[k], chunk)[1],
                               nearest_neighbours(train[k], train[k], chunk, exclude_self=True)[1]])
            for k in train}


def screen_signals(train: dict, val: dict, synthetic: dict, percentile: float = PERCENTILE,
                   chunk: int = 4096) -> dict:
    """Copies and memorised volumes from one or more signals: {signal: (N, D) rows} for each set.

    Returns dict(thresholds {signal: r}, rule (:class:`Rule` of copies, fitted on
    :func:`copy_null`), memorized_rule (fitted on train -> nearest validation), is_copy,
    is_memorized, n_copies, copy_share, n_memorized, memorized_share, per_signal {signal:
    {train_val, synthetic_train, train_synthetic: (nearest index, r), copy_null: r}}, decider:
    the signal of each synthetic volume with the larger standardised score (whose nearest
    training volume is reported), scores: each synthetic volume's combined score (the threshold
    is ``rule.limit``)).
    """
    names = list(train)
    null = copy_null(train, val, chunk)
    per = {k: {"train_val": nearest_neighbours(train[k], val[k], chunk),
               "synthetic_train": nearest_neighbours(synthetic[k], train[k], chunk),
               "train_synthetic": nearest_neighbours(train[k], synthetic[k], chunk), "copy_null": null[k]}
           for k in names}
    rule = Rule(null, percentile)
    mem_rule = Rule({k: per[k]["train_val"][1] for k in names}, percentile)
    st = {k: per[k]["synthetic_train"][1] for k in names}
    ts = {k: per[k]["train_synthetic"][1] for k in names}
    is_copy = np.any(list(rule.flags(st).values()), axis=0)
    is_mem = np.any(list(mem_rule.flags(ts).values()), axis=0)
    z = rule.standardised(st)
    return {"thresholds": rule.thresholds, "rule": rule, "memorized_rule": mem_rule,
            "memorized_thresholds": mem_rule.thresholds, "percentile": float(percentile), "is_copy": is_copy,
            "is_memorized": is_mem, "n_copies": int(is_copy.sum()), "copy_share": float(is_copy.mean()),
            "n_memorized": int(is_mem.sum()), "memorized_share": float(is_mem.mean()), "per_signal": per,
            "decider": [names[i] for i in z.argmax(axis=0)], "scores": z.max(axis=0)}


def image_rows(inputs: torch.Tensor) -> np.ndarray:
    """The image signal's rows (before centring) of encoder inputs (N, C, X, Y, Z): every
    channel's slices through the in-plane difference of Gaussians IMAGE_BAND_SIGMAS."""
    from .degrade import band_pass_in_plane

    n = int(inputs.shape[0])
    x = band_pass_in_plane(inputs.reshape(-1, 1, *inputs.shape[2:]).float(), IMAGE_BAND_SIGMAS)
    return x.reshape(n, -1).double().numpy()


@torch.no_grad()
def _signals_of_inputs(model, inputs: torch.Tensor, batch_size: int = 16) -> dict:
    from .encoder import embed_inputs

    return {"encoder": embed_inputs(model, inputs, batch_size), "image": image_rows(inputs)}


@torch.no_grad()
def set_signals(model, eval_set, batch_size: int = 8, quiet: bool = True) -> dict:
    """{signal: (N, D) rows} of an EvalSet, reading each volume once, a batch at a time."""
    from .encoder import encoder_input, progress

    n = len(eval_set)
    bar = progress(n, f"embed {eval_set.arg}", quiet, "vol")
    parts = []
    for start in range(0, n, batch_size):
        x = torch.stack([encoder_input(eval_set.unit(i), model.cfg) for i in range(start, min(n, start + batch_size))])
        parts.append(_signals_of_inputs(model, x, batch_size))
        bar.update(int(x.shape[0]))
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in SIGNALS}


def _centre_images(sets: list) -> np.ndarray:
    """Subtract the first set's (training) mean image row from every set's image rows, in place."""
    mean = sets[0]["image"].mean(axis=0)
    for s in sets:
        s["image"] = s["image"] - mean
    return mean


def calibrate(model, train_set, val_set, train_sig: dict, val_sig: dict, mean_image: np.ndarray,
              percentile: float = PERCENTILE, n_sources: int = 8, seed: int = 0, quiet: bool = True,
              strengths=None) -> dict:
    """What the screen can see on this data: degraded copies (:mod:`.degrade`, every kind at
    every strength) of ``n_sources`` training volumes (evenly spread over the set) are screened
    against the training set, and each validation volume - a new subject - is screened with the
    threshold refitted without it (leave-one-out, so it is never judged by a threshold it set).

    train_sig/val_sig: the sets' signals as screened (image rows centred on ``mean_image``, the
    training mean, which is subtracted from the planted copies' rows too).
    Returns dict(rows [{kind, strength, degradation, n, recall, matched, min_r}], false_positive_rate,
    n_fresh, n_fresh_flagged, sources, rule).
    """
    from .datasets import to_unit
    from .degrade import STRENGTHS, degrade, describe, kinds_for
    from .encoder import encoder_input, progress

    names = list(train_sig)
    strengths = strengths or STRENGTHS
    null = copy_null(train_sig, val_sig)
    rule = Rule(null, percentile)
    kinds = kinds_for(train_set.is_cine)
    n_src = max(1, min(int(n_sources), len(train_set)))
    sources = sorted({int(round(v)) for v in np.linspace(0, len(train_set) - 1, n_src)})
    rng = np.random.default_rng(seed)
    planted = []  # (kind, strength, source index, encoder input)
    bar = progress(len(sources), "calibrate: plant copies", quiet, "vol")
    for j in sources:
        raw = train_set.load(j)["image"]
        for kind in kinds:
            for st in strengths[kind]:
                planted.append((kind, st, j, encoder_input(to_unit(degrade(raw, kind, st, rng), train_set.modality),
                                                           model.cfg)))
        bar.update(1)
    bar.close()
    sig = _signals_of_inputs(model, torch.stack([p[3] for p in planted]))
    sig["image"] = sig["image"] - mean_image
    nn = {k: nearest_neighbours(sig[k], train_sig[k]) for k in names}
    flagged = np.any(list(rule.flags({k: v[1] for k, v in nn.items()}).values()), axis=0)
    best = [names[i] for i in rule.standardised({k: v[1] for k, v in nn.items()}).argmax(axis=0)]
    groups: dict = {}
    for i, (kind, st, j, _) in enumerate(planted):
        groups.setdefault((kind, st), []).append((bool(flagged[i]), int(nn[best[i]][0][i]) == j, nn["encoder"][1][i]))
    rows = [{"kind": k, "strength": st, "degradation": describe(k, st), "n": len(v),
             "recall": float(np.mean([f for f, _, _ in v])), "matched": float(np.mean([f and m for f, m, _ in v])),
             "min_r": float(min(r for _, _, r in v))} for (k, st), v in groups.items()]
    # leave-one-out false positives among the validation volumes (the null's first nv entries
    # are theirs: validation -> nearest training)
    nv = len(val_sig[names[0]])
    fp = 0
    for v in range(nv):
        keep = np.arange(len(null[names[0]])) != v
        loo = Rule({k: null[k][keep] for k in names}, percentile)
        fp += bool(any(loo.flags({k: null[k][v:v + 1] for k in names})[k][0] for k in names))
    return {"rows": rows, "n_fresh": nv, "n_fresh_flagged": fp, "false_positive_rate": fp / nv if nv else float("nan"),
            "sources": len(sources), "thresholds": rule.thresholds,
            "fresh_rule": "each validation volume screened against the training set with the threshold refitted "
                          "without it (leave-one-out)",
            "recall_rule": "share of the planted copies flagged as copies; matched: flagged and paired with the "
                           "training volume it was made from"}


def screen_sets(train_set, val_set, synthetic_set, encoder=None, cfg=None, quiet: bool = True,
                chunk: int = 4096, percentile: float = PERCENTILE, batch_size: int = 8, device="cpu",
                encoder_path=None, calibration: bool = False, log_fn=None) -> dict:
    """Obtain the encoder (given, from ``encoder_path``, the cache, or trained: see
    :func:`.encoder.obtain_encoder`), compute both signals of the three sets and screen the
    synthetic one; ``calibration``: also :func:`calibrate` on the training and validation sets.

    Returns the report dict (JSON-ready); ``"_model"`` holds the encoder and
    ``"_signals"`` the signals of the three sets (both dropped from report.json).
    """
    from . import encoder as enc
    from .datasets import EvalInputError, check_compatible

    check_compatible(train_set, val_set, synthetic_set)
    want = "cine" if train_set.is_cine else "volume"
    inputs = None
    if encoder is None:
        cfg = cfg or enc.EncoderConfig()
        encoder, info, inputs = enc.obtain_encoder(train_set, cfg, encoder_path, quiet=quiet, device=device,
                                                   log=log_fn)
    else:
        if encoder.cfg.kind != want or encoder.cfg.modality != train_set.modality:
            raise EvalInputError(f"--encoder: trained on {encoder.cfg.modality.upper()} {encoder.cfg.kind} inputs but "
                                 f"--train holds {train_set.modality.upper()} {want} inputs")
        info = {"source": "given", "file": None, "matches_data": None}
    cfg = encoder.cfg
    sig_train = (_signals_of_inputs(encoder, inputs) if inputs is not None
                 else set_signals(encoder, train_set, batch_size, quiet))
    del inputs
    sig_val = set_signals(encoder, val_set, batch_size, quiet)
    sig_syn = set_signals(encoder, synthetic_set, batch_size, quiet)
    mean_image = _centre_images([sig_train, sig_val, sig_syn])
    s = screen_signals(sig_train, sig_val, sig_syn, percentile, chunk)
    tn, vn, sn = train_set.names, val_set.names, synthetic_set.names
    per = s["per_signal"]
    tv_idx, tv_r = per["encoder"]["train_val"]
    _, tv_ri = per["image"]["train_val"]
    st = {k: per[k]["synthetic_train"] for k in SIGNALS}
    ts = {k: per[k]["train_synthetic"] for k in SIGNALS}
    flags_st = s["rule"].flags({k: st[k][1] for k in SIGNALS})
    z_ts = s["memorized_rule"].standardised({k: ts[k][1] for k in SIGNALS})
    ts_by = [SIGNALS[i] for i in z_ts.argmax(axis=0)]
    size = list(cfg.size)
    if cfg.kind == "volume":
        representation = ("3D volume in [-1, 1] (" + ("CT: [-1000, 1000] HU" if cfg.modality == "ct" else
                          "MR: min-max") + f"), one channel, area-averaged to {size}, standardised")
    else:
        representation = (f"cine in [-1, 1] (min-max over the whole cine); frames as channels: {cfg.n_frames} "
                          f"frames evenly spaced over the cycle from the first stored frame, each resampled to {size}; "
                          "standardised")
    notes = []
    if not 0.5 <= len(val_set) / max(1, len(synthetic_set)) <= 2.0:
        notes.append(f"--val has {len(val_set)} volumes and --synthetic {len(synthetic_set)}: the memorisation "
                     "threshold (training -> nearest validation volume) is calibrated for sets of about equal size "
                     "(the nearest of more volumes correlates higher), so expect more or fewer than 5% of training "
                     "volumes above it by chance")
    if len(train_set) < 20:
        notes.append(f"only {len(train_set)} training volumes: the 95th percentile of so few correlations is a rough "
                     "estimate")
    if info.get("matches_data") is False:
        notes.append("--encoder was trained on other volumes than --train; delete it (or pass a new path) to train "
                     "one on this training set")
    hist = cfg.history or {}
    report = {
        "kind": "memorization",
        "notes": notes,
        "method": ("Dar et al.: self-supervised NT-Xent encoder, Pearson correlation between embeddings; with a "
                   "second signal, the Pearson correlation of band-passed images centred on the training mean"),
        "threshold": s["thresholds"]["encoder"],
        "thresholds": dict(s["thresholds"]),
        "score_threshold": s["rule"].limit,
        "threshold_rule": (f"per signal, Fisher z of new subjects' Pearson r with their nearest training volume "
                           "(each validation volume's, and each training volume's with the other training volumes), "
                           f"standardised; {percentile:g}th percentile ((n + 1) p-th order statistic, interpolated) "
                           "of the larger of the two, turned back into an r threshold per signal; a volume above "
                           "either threshold is a copy. Memorised: the same rule on each training volume's r with its "
                           "nearest validation volume (the published rule), applied to its nearest synthetic volume"),
        "memorized_thresholds": dict(s["memorized_thresholds"]),
        "signals": {"encoder": "Pearson r between the encoder's embeddings (the published method)",
                    "image": ("Pearson r between the encoder's input grids, each slice band-passed (in-plane "
                              f"difference of Gaussians, sigmas {IMAGE_BAND_SIGMAS[0]:g} and {IMAGE_BAND_SIGMAS[1]:g} "
                              "voxels) and centred on the training mean: catches noisy, blurred, intensity-drifted "
                              "and slightly deformed copies whatever the encoder learned; shifts escape it")},
        "copy_share": s["copy_share"],
        "n_copies": s["n_copies"],
        "memorized_share": s["memorized_share"],
        "n_memorized": s["n_memorized"],
        "sets": {k: {"folder": str(x.root), "layout": x.layout, "n": len(x), "modality": x.modality,
                     "cine": x.is_cine} for k, x in (("train", train_set), ("val", val_set),
                                                    ("synthetic", synthetic_set))},
        "encoder": {"source": info["source"], "trained_here": info["source"] == "trained", "path": info.get("file"),
                    "trained_on_this_train": info.get("matches_data"), "seconds": info.get("seconds"),
                    "representation": representation,
                    "architecture": (f"{len(cfg.channels)} MONAI Convolution stages (3^3 conv, batch norm, ReLU; widths "
                                     f"{list(cfg.channels)}) with 2x average pooling between them; global "
                                     f"averages of all stages -> projection head -> {cfg.proj_dim}-d embedding, "
                                     f"averaged over in-plane shifts of the input by up to {cfg.tta_shift} voxel(s)"),
                    "loss": f"NT-Xent (monai.losses.ContrastiveLoss, temperature {cfg.temperature})",
                    "positives": (f"a volume and a degraded view of it: rotation <= {cfg.aug_rotate_deg:g} deg, scale "
                                  f"+-{cfg.aug_scale:g}, shift <= {cfg.aug_shift:g} of the grid, smooth deformation <= "
                                  f"{cfg.aug_deform:g} voxel, blur sigma <= {cfg.aug_blur:g} voxel, noise std <= "
                                  f"{cfg.aug_noise:g} (standardised scale)"
                                  + (f", frames shifted by <= {cfg.aug_temporal:g}" if cfg.kind == "cine" else "")),
                    "steps": hist.get("steps"), "stopped": hist.get("stopped"),
                    **({"saved_to": info["saved_to"]} if "saved_to" in info else {}), "config": cfg.to_dict()},
        "distributions": {"train_to_nearest_val": describe(tv_r), "synthetic_to_nearest_train": describe(st["encoder"][1]),
                          "new_subject_to_nearest_train": describe(per["encoder"]["copy_null"]),
                          "train_to_nearest_synthetic": describe(ts["encoder"][1]),
                          "image": {"train_to_nearest_val": describe(tv_ri),
                                    "new_subject_to_nearest_train": describe(per["image"]["copy_null"]),
                                    "synthetic_to_nearest_train": describe(st["image"][1])}},
        "synthetic": [{"name": sn[i], "nearest_train": tn[int(st[s["decider"][i]][0][i])], "r": float(st["encoder"][1][i]),
                       "r_image": float(st["image"][1][i]),
                       "score": float(s["scores"][i]), "flagged_by": [k for k in SIGNALS if flags_st[k][i]],
                       "is_copy": bool(s["is_copy"][i])}
                      for i in range(len(sn))],
        "train": [{"name": tn[i], "nearest_synthetic": sn[int(ts[ts_by[i]][0][i])], "r": float(ts["encoder"][1][i]),
                   "r_image": float(ts["image"][1][i]), "score": float(z_ts.max(axis=0)[i]),
                   "is_memorized": bool(s["is_memorized"][i]),
                   "nearest_val": vn[int(tv_idx[i])], "r_val": float(tv_r[i]), "r_val_image": float(tv_ri[i])}
                  for i in range(len(tn))],
        "_model": encoder,
        "_signals": {"train": sig_train, "val": sig_val, "synthetic": sig_syn},
    }
    if calibration:
        report["calibration"] = calibrate(encoder, train_set, val_set, sig_train, sig_val, mean_image, percentile,
                                          seed=cfg.seed, quiet=quiet)
    return report
