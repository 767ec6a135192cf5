"""Evaluation: copy detection on phantoms with planted copies, every metric against a small
case computed here independently, the sharing gate, reports and bad input.

The copy-detection encoder is trained once (module fixture, ~1 minute on one CPU thread)
and reused through --encoder by the other CLI tests.
"""
from __future__ import annotations

import itertools
import re
import json
import math

import numpy as np
import pytest
import torch

from medgen_rt.cli import main
from medgen_rt.data.phantoms import (make_cine_phantom, make_ct_phantom, subject_seed, write_acdc_dataset,
                                     write_ct_dataset)
from medgen_rt.evaluation import metrics as M
from medgen_rt.evaluation.datasets import EvalInputError, open_set
from medgen_rt.evaluation.energy import CAR_G_CO2E_PER_KM, energy_summary
from medgen_rt.evaluation.memorization import copy_threshold, nearest_neighbours, screen_embeddings
from medgen_rt.io.nifti import read_volume, write_volume
from medgen_rt.io.outputs import write_generated

SHAPE, SPACING = (32, 32, 16), (11.2, 11.2, 16.0)  # the whole adult thorax, coarsely
N_TRAIN = N_VAL = N_FRESH = 40
N_PLANTED = 10  # training subjects copied exactly, and the same ten lightly augmented


pytestmark = pytest.mark.usefixtures("one_thread")


def _ct(seed: int, i: int):
    return make_ct_phantom(subject_seed(seed, i), shape=SHAPE, spacing=SPACING)


def _energy(kwh: float) -> dict:
    return {"country": "DEU", "run_kwh": kwh * 4, "run_kg_co2e": kwh * 4 * 0.4,
            "per_volume": {"kwh": kwh, "kg_co2e": kwh * 0.4}}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """train/val: `medgen phantom ct` layout; synthetic: `medgen sample` layout with fresh
    phantoms (seed 2) and planted copies of training subjects (exact; shifted by one voxel
    plus 15 HU noise); clean: fresh phantoms only."""
    root = tmp_path_factory.mktemp("eval")
    write_ct_dataset(root / "train", N_TRAIN, seed=0, quiet=True, shape=SHAPE, spacing=SPACING)
    write_ct_dataset(root / "val", N_VAL, seed=1, quiet=True, shape=SHAPE, spacing=SPACING)
    rng = np.random.default_rng(7)
    syn, clean = root / "synthetic", root / "clean"
    for i in range(1, N_FRESH + 1):
        ph = _ct(2, i)
        for d in (syn, clean):
            write_generated(d, f"fresh_{i:03d}", ph.image, ph.affine, "ct", {"energy": _energy(0.01)}, mask=ph.labels)
    for k in range(1, N_PLANTED + 1):
        src = read_volume(root / "train" / "images" / f"ct_{k:03d}.nii.gz")
        write_generated(syn, f"exact_{k:03d}", src.array, src.affine, "ct", {})
        shifted = np.roll(src.array, 1, axis=k % 2) + rng.normal(0.0, 15.0, src.array.shape)
        write_generated(syn, f"shifted_{k:03d}", shifted, src.affine, "ct", {})
    return root


@pytest.fixture(scope="module")
def screened(sets):
    """`medgen eval memorization` on the planted set; trains the encoder and saves it."""
    out, enc = sets / "report", sets / "encoder.safetensors"
    rc = main(["eval", "memorization", "--train", str(sets / "train"), "--val", str(sets / "val"),
               "--synthetic", str(sets / "synthetic"), "--out", str(out), "--encoder", str(enc), "--quiet"])
    assert rc == 0
    return json.loads((out / "report.json").read_text()), out, enc


# --------------------------------------------------------------------------- (a) screening


def test_planted_copies_are_found(screened):
    rep, out, enc = screened
    by_kind = {}
    for s in rep["synthetic"]:
        by_kind.setdefault(s["name"].split("_")[0], []).append(s)
    planted = by_kind["exact"] + by_kind["shifted"]
    recall = sum(s["is_copy"] for s in planted) / len(planted)
    false_pos = sum(s["is_copy"] for s in by_kind["fresh"]) / len(by_kind["fresh"])
    print(f"\nplanted copies: recall {recall:.3f} (exact {sum(s['is_copy'] for s in by_kind['exact'])}/{N_PLANTED}, "
          f"shifted+noise {sum(s['is_copy'] for s in by_kind['shifted'])}/{N_PLANTED}); fresh flagged "
          f"{false_pos:.3f} ({sum(s['is_copy'] for s in by_kind['fresh'])}/{N_FRESH}); "
          f"threshold {rep['threshold']:.4f}")
    assert recall >= 0.9
    assert false_pos <= 0.10
    # each planted copy is matched to the subject it was copied from
    assert all(s["nearest_train"] == "ct_" + s["name"].split("_")[1] for s in planted if s["is_copy"])
    assert rep["copy_share"] == pytest.approx(rep["n_copies"] / len(rep["synthetic"]))
    # the memorisation rule: 5% of the training volumes (the 95th percentile of 40: 2) have a
    # nearest validation volume above one of the two signals' thresholds
    thr = rep["memorized_thresholds"]
    assert sum(t["r_val"] > thr["encoder"] or t["r_val_image"] > thr["image"] for t in rep["train"]) == 2
    # the copy rule's new subjects are searched against the training set, as the samples are:
    # the 40 validation volumes and each of the 40 training volumes against the other 39
    assert rep["distributions"]["new_subject_to_nearest_train"]["n"] == N_TRAIN + N_VAL
    memorized = {t["name"] for t in rep["train"] if t["is_memorized"]}
    assert {f"ct_{k:03d}" for k in range(1, N_PLANTED + 1)} <= memorized
    assert rep["memorized_share"] == pytest.approx(len(memorized) / N_TRAIN)
    # report: pictures of the top pairs, a self-contained page, the encoder
    pairs = sorted(p.name for p in (out / "pairs").iterdir())
    assert len(pairs) == 8 and all(p.endswith(".png") for p in pairs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 9 and "src='http" not in html
    assert enc.is_file() and rep["encoder"]["saved_to"] == str(enc)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_loaded_encoder_reproduces_the_screening(sets, screened, tmp_path):
    rep, _, enc = screened
    out = tmp_path / "again"
    assert main(["eval", "memorization", "--train", str(sets / "train"), "--val", str(sets / "val"),
                 "--synthetic", str(sets / "synthetic"), "--out", str(out), "--encoder", str(enc), "--quiet",
                 "--top-k", "2"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["encoder"]["trained_here"] is False
    assert again["threshold"] == pytest.approx(rep["threshold"], abs=1e-6)
    assert [s["is_copy"] for s in again["synthetic"]] == [s["is_copy"] for s in rep["synthetic"]]
    assert len(list((out / "pairs").iterdir())) == 2


# --------------------------------------------------------------------------- (c) sharing gate


def test_share_refuses_planted_copies(sets, screened, tmp_path, capsys):
    out = tmp_path / "shared"
    rc = main(["share", "--synthetic", str(sets / "synthetic"), "--train", str(sets / "train"), "--val",
               str(sets / "val"), "--out", str(out), "--encoder", str(screened[2]), "--quiet"])
    assert rc == 3
    assert "refused" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # nothing but the report
    rep = json.loads((out / "report.json").read_text())
    assert rep["sharing"]["decision"] == "refused" and rep["sharing"]["shared"] == []
    # the shared report names no training volume
    text = (out / "report.json").read_text() + (out / "report.html").read_text()
    assert re.search(r"\bct_\d{3}", text) is None and "pairs/" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no temporary folder left


def test_share_force_withholds_the_copies(sets, screened, tmp_path):
    out = tmp_path / "forced"
    assert main(["share", "--synthetic", str(sets / "synthetic"), "--train", str(sets / "train"), "--val",
                 str(sets / "val"), "--out", str(out), "--encoder", str(screened[2]), "--quiet", "--force"]) == 0
    flagged = {s["name"] for s in screened[0]["synthetic"] if s["is_copy"]}
    shared = {p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz") if not p.name.endswith("_mask.nii.gz")}
    assert shared and not shared & flagged
    assert shared | flagged == {s["name"] for s in screened[0]["synthetic"]}


def test_share_passes_a_clean_set(sets, screened, tmp_path, capsys):
    out = tmp_path / "clean"
    rc = main(["share", "--synthetic", str(sets / "clean"), "--train", str(sets / "train"), "--val",
               str(sets / "val"), "--out", str(out), "--encoder", str(screened[2]), "--quiet",
               "--max-copy-share", "0.1"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["sharing"]["decision"] == "shared" and rep["copy_share"] <= 0.1
    withheld = set(rep["sharing"]["withheld"])
    for i in range(1, N_FRESH + 1):
        name = f"fresh_{i:03d}"
        files = [out / f"{name}{ext}" for ext in (".nii.gz", "_mask.nii.gz", ".json", ".png")]
        assert all(f.is_file() for f in files) == (name not in withheld)
        assert not any(f.exists() for f in files) or name not in withheld
    assert not (out / "encoder.safetensors").exists() and not (out / "summary.json").exists()
    assert rep["energy"]["sampling"]["n_volumes"] == N_FRESH  # from the sidecars


def test_share_needs_an_empty_out(sets, screened, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["share", "--synthetic", str(sets / "clean"), "--train", str(sets / "train"), "--val",
               str(sets / "val"), "--out", str(out), "--encoder", str(screened[2]), "--quiet"])
    assert rc == 2 and "--out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --------------------------------------------------------------------------- quality (CLI)


def test_quality_report_ct(sets, screened, tmp_path):
    out = tmp_path / "quality"
    run = tmp_path / "run"
    run.mkdir()
    (run / "energy.json").write_text(json.dumps({"kwh": 2.0, "kg_co2e": 0.8, "seconds": 10, "sessions": [{}]}))
    assert main(["eval", "quality", "--real", str(sets / "val"), "--synthetic", str(sets / "clean"), "--out",
                 str(out), "--encoder", str(screened[2]), "--train-run", str(run), "--quiet",
                 "--max-pairs", "10"]) == 0
    rep = json.loads((out / "report.json").read_text())
    div = rep["ms_ssim_diversity"]["synthetic"]
    assert 0 < div["mean"] < 1 and div["n_pairs"] == 10
    assert rep["fid"]["value"] >= 0 and math.isfinite(rep["mmd"]["mmd2"])
    assert set(rep["inter_slice"]) >= {"mad", "nmad", "pearson"} and rep["temporal"] is None
    # fresh subjects of the real population: as close to it as the real subjects are to each other
    rl = rep["realism"]
    assert 0.9 < rl["ratio"] < 1.1 and len(rl["synthetic"]) == N_FRESH and len(rl["real"]) == N_VAL
    assert rl["grid"] == list(SHAPE) and rl["synthetic"][0]["name"] == "fresh_001"
    # same population, maps painted from the labels: Dice by HU ranges as good as the real
    # reference, and clearly above the swapped-map control (this coarse 11.2 mm grid is below
    # the geometries the ranges were tuned on, so the myocardium bound is looser)
    ma = rep["mask_adherence"]
    for g, lo in (("blood", 0.9), ("myocardium", 0.7)):
        own, swapped = ma["synthetic"]["own_map"][g], ma["synthetic"]["swapped_map"][g]
        assert own["n"] == swapped["n"] == N_FRESH
        assert own["mean"] > lo and own["mean"] > swapped["mean"] + 0.2
        assert own["mean"] == pytest.approx(ma["real_reference"]["own_map"][g]["mean"], abs=0.05)
    v = ma["per_volume"][1]
    assert v["name"] == "fresh_002" and v["control_map"] == "fresh_001" and v["blood"] > v["control_blood"]
    assert ma["per_volume"][0]["control_map"] == f"fresh_{N_FRESH:03d}"
    e = rep["energy"]
    assert e["training"]["kwh"] == pytest.approx(2.0) and e["sampling"]["kwh"] == pytest.approx(0.4)
    assert e["total"]["driving_km"] == pytest.approx((0.8 + 0.16) * 1000 / CAR_G_CO2E_PER_KM)
    html = (out / "report.html").read_text()
    assert "120.4 g CO2e per km" in html and html.count("data:image/png;base64,") >= 9
    assert "as close to the real population as new real subjects" in html and "swapped map" in html


def test_quality_cine_with_labels(tmp_path):
    kw = dict(shape=(24, 24, 4), spacing=(6.0, 6.0, 16.0), n_frames=6)
    # 8 and 6 subjects: with 4 and 3 the band-passed realism of two phantom sets swung to 1.7
    write_acdc_dataset(tmp_path / "real", 8, seed=0, quiet=True, **kw)
    write_acdc_dataset(tmp_path / "syn", 6, seed=5, quiet=True, **kw)
    out = tmp_path / "q"
    assert main(["eval", "quality", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--out",
                 str(out), "--steps", "3", "--frames", "4", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    manifest = json.loads((tmp_path / "syn" / "dataset.json").read_text())
    ef = sorted(c["ef_percent"] for c in rep["cardiac"]["per_volume"]["synthetic"])
    assert ef == pytest.approx(sorted(s["ejection_fraction"] for s in manifest["subjects"]), abs=1e-3)
    assert rep["temporal"]["closure"]["synthetic"]["n"] == 6
    assert len(rep["realism"]["synthetic"]) == 6 and rep["realism"]["grid"] == [24, 24, 4, 6]
    assert 0.8 < rep["realism"]["ratio"] < 1.2
    assert rep["ms_ssim_diversity"]["synthetic"]["spatial_dims"] == 2
    assert (out / "encoder.safetensors").is_file()
    assert rep["features"]["extractor"].startswith("copy-detection encoder")
    # copy detection of cines (frames as channels) with that encoder: the real set screened
    # against itself is all copies
    mem = tmp_path / "m"
    assert main(["eval", "memorization", "--train", str(tmp_path / "real"), "--val", str(tmp_path / "syn"),
                 "--synthetic", str(tmp_path / "real"), "--out", str(mem), "--encoder",
                 str(out / "encoder.safetensors"), "--quiet"]) == 0
    m = json.loads((mem / "report.json").read_text())
    assert m["copy_share"] == 1.0 and "frames as channels" in m["encoder"]["representation"]
    assert all(s["r"] == pytest.approx(1.0) and s["nearest_train"] == s["name"] for s in m["synthetic"])


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument(sets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cine = tmp_path / "cine"
    ph = make_cine_phantom(0, shape=(16, 16, 4), n_frames=4, spacing=(9.0, 9.0, 16.0))
    write_volume(cine / "c.nii.gz", ph.image, ph.affine)
    base = ["eval", "memorization", "--train", str(sets / "train"), "--out", str(tmp_path / "o"), "--quiet"]
    for extra, where, what in (
            (["--val", str(tmp_path / "nope"), "--synthetic", str(sets / "clean")], "--val", "does not exist"),
            (["--val", str(sets / "val"), "--synthetic", str(empty)], "--synthetic", "no NIfTI"),
            (["--val", str(sets / "val"), "--synthetic", str(cine)], "--synthetic", "cines")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert where in err and what in err, err
    # shapes that differ within the synthetic set stop the voxel-wise metrics
    odd = tmp_path / "odd"
    for i, shape in enumerate(((32, 32, 16), (32, 32, 12))):
        p = make_ct_phantom(i, shape=shape, spacing=SPACING)
        write_volume(odd / f"v{i}.nii.gz", p.image, p.affine, kind="ct")
    assert main(["eval", "quality", "--real", str(sets / "val"), "--synthetic", str(odd), "--out",
                 str(tmp_path / "q"), "--steps", "1", "--quiet"]) == 2
    assert "--synthetic" in capsys.readouterr().err
    # a mask of the wrong shape
    bad = tmp_path / "badmask"
    p = make_ct_phantom(0, shape=SHAPE, spacing=SPACING)
    write_volume(bad / "v.nii.gz", p.image, p.affine, kind="ct")
    write_volume(bad / "v_mask.nii.gz", p.labels[:, :, :8], p.affine, kind="label")
    with pytest.raises(EvalInputError, match="--synthetic: mask"):
        open_set(bad, "--synthetic").load(0)
    assert main(["eval", "quality", "--real", str(sets / "val"), "--synthetic", str(sets / "clean"), "--out",
                 str(tmp_path / "q2"), "--features", "medicalnet:/no/such.pth"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_set_layouts(sets):
    syn = open_set(sets / "synthetic", "--synthetic")
    assert syn.layout == "flat" and syn.modality == "ct" and len(syn) == N_FRESH + 2 * N_PLANTED
    e = next(e for e in syn.entries if e.name == "fresh_001")
    assert sorted(str(f) for f in e.files) == ["fresh_001.json", "fresh_001.nii.gz", "fresh_001.png",
                                               "fresh_001_mask.nii.gz"]
    item = syn.load(syn.names.index("fresh_001"))
    assert item["mask"].shape == SHAPE and item["sidecar"]["modality"] == "ct"
    train = open_set(sets / "train", "--train")
    assert train.layout == "images" and train.entries[0].mask is not None


# --------------------------------------------------------------------------- (b) metrics by hand


def test_nearest_neighbours_and_threshold():
    rng = np.random.default_rng(0)
    q, ref = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    r = np.array([[np.corrcoef(a, b)[0, 1] for b in ref] for a in q])
    for chunk in (1, 3, 100):
        idx, best = nearest_neighbours(q, ref, chunk=chunk)
        np.testing.assert_array_equal(idx, r.argmax(1))
        np.testing.assert_allclose(best, r.max(1), atol=1e-12)
    idx, _ = nearest_neighbours(ref, ref, chunk=4, exclude_self=True)
    assert not np.any(idx == np.arange(9))
    vals = np.array([0.1, 0.5, 0.9, 0.2, 0.7, 0.3, 0.8, 0.4, 0.6, 1.0, 0.0, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85,
                     0.95, 0.15, 0.25])
    s = np.sort(vals)
    # the (n + 1) p-th smallest: 0.95 * 21 = 19.95, between the 19th and 20th smallest (a new value
    # lands above it with probability 1.05 / 21 = 5%)
    assert copy_threshold(vals) == pytest.approx(s[18] + 0.95 * (s[19] - s[18]))


def test_screen_embeddings_by_hand():
    # Embeddings chosen so the correlations are known: train rows are orthogonal patterns.
    train = np.array([[1, -1, 0, 0], [0, 0, 1, -1], [1, 1, -1, -1]], dtype=float)
    val = np.array([[1, -0.5, 0, -0.5], [0, 0.2, 1, -1.2], [1, 1, -1, -0.6]])
    syn = np.array([[2, -2, 0, 0], [1, 1, 0, -2], [0, 0, 3, -3]])
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    tv = [max(corr(t, v) for v in val) for t in train]
    thr = float(np.percentile(tv, 95, method="weibull"))  # the (n + 1) p-th smallest (memorization.copy_threshold)
    s = screen_embeddings(train, val, syn)
    assert s["threshold"] == pytest.approx(thr)
    st = [max(corr(x, t) for t in train) for x in syn]
    want = [r > thr for r in st]
    assert list(s["synthetic_train"][2]) == want and s["copy_share"] == pytest.approx(np.mean(want))
    assert want == [True, False, True]  # exact multiples of training rows are copies
    ts = [max(corr(t, x) for x in syn) for t in train]
    assert list(s["train_synthetic"][2]) == [r > thr for r in ts]


def test_wasserstein_by_hand():
    assert M.wasserstein_1d([0, 1, 3], [5, 6, 8]) == pytest.approx(5.0)  # a pure shift by 5
    assert M.wasserstein_1d([0, 1], [0]) == pytest.approx(0.5)
    assert M.wasserstein_1d([0, 0, 1, 1], [0, 1]) == pytest.approx(0.0)
    assert M.wasserstein_1d([1.0, 2.0, np.nan], [2.0]) == pytest.approx(0.5)


def test_frechet_distance_by_hand():
    x = np.array([[0.0], [2.0], [4.0]])  # mean 2, var 4
    y = np.array([[1.0], [2.0], [3.0]])  # mean 2, var 1
    assert M.frechet_distance(x, y) == pytest.approx((2 - 2) ** 2 + (2 - 1) ** 2)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(1.0, 2.0, size=(25, 4)) @ rng.normal(size=(4, 4))
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr sqrt(Sa Sb) = sum of the square roots of the (real, non-negative) eigenvalues of Sa Sb
    tr = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_mmd_by_hand():
    x = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    y = [[3.0, 1.0], [2.0, 2.0]]

    def k(a, b):
        return math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / 2.0)

    xx = sum(k(a, b) for a, b in itertools.permutations(x, 2)) / (3 * 2)
    yy = sum(k(a, b) for a, b in itertools.permutations(y, 2)) / (2 * 1)
    xy = sum(k(a, b) for a in x for b in y) / (3 * 2)
    out = M.mmd_rbf(x, y, bandwidth=1.0)
    assert out["mmd2"] == pytest.approx(xx + yy - 2 * xy)
    d = [math.dist(a, b) for a, b in itertools.combinations(x + y, 2)]
    assert M.mmd_rbf(x, y)["bandwidth"] == pytest.approx(float(np.median(d)))


def _ssim_numpy(a, b, size=7, sigma=1.5, k1=0.01, k2=0.03):
    """Gaussian-window SSIM over the valid region, written out with loops."""
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = k1 ** 2, k2 ** 2
    vals = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ms_ssim_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.random((16, 16))
    b = np.clip(a + 0.2 * rng.random((16, 16)), 0, 1)
    one_scale = {"kernel_size": [7, 7], "weights": [1.0]}
    assert M.ms_ssim(a[None], b[None], 2, one_scale) == pytest.approx(_ssim_numpy(a, b), abs=1e-5)
    vol = rng.random((32, 32, 16)).astype(np.float32)
    assert M.ms_ssim(vol[None], vol[None], 3) == pytest.approx(1.0, abs=1e-5)
    s = M.ms_ssim_settings((32, 32, 16))
    assert s["scales"] == 3 and s["kernel_size"] == [7, 7, 3]
    assert s["weights"] == pytest.approx(np.array(M.MS_SSIM_WEIGHTS[:3]) / sum(M.MS_SSIM_WEIGHTS[:3]))
    div = M.ms_ssim_diversity([vol, vol, vol])
    assert div["n_pairs"] == 3 and div["mean"] == pytest.approx(1.0, abs=1e-5)
    assert M.ms_ssim_diversity([vol] * 6, max_pairs=4)["n_pairs"] == 4


def test_interslice_by_hand():
    v = np.zeros((2, 2, 3))
    v[:, :, 0] = [[0.2, 0.4], [0.6, 0.8]]
    v[:, :, 1] = [[0.3, 0.5], [0.7, 0.9]]  # slice 0 + 0.1: perfectly correlated
    v[:, :, 2] = [[0.9, 0.7], [0.5, 0.3]]  # reversed: r = -1
    s = M.interslice(v)
    np.testing.assert_allclose(s["mad"], [0.1, (0.6 + 0.2 + 0.2 + 0.6) / 4])
    np.testing.assert_allclose(s["nmad"], [0.1 / 0.55, 0.4 / 0.6])
    np.testing.assert_allclose(s["pearson"], [1.0, -1.0])
    flat = np.zeros((2, 2, 2))
    assert np.isnan(M.interslice(flat)["pearson"][0]) and np.isnan(M.interslice(flat)["nmad"][0])
    assert M.interslice(np.stack([v, v], axis=3))["mad"].shape == (4,)  # every frame of a cine


def test_temporal_by_hand():
    v = np.zeros((2, 2, 1, 4))
    for t, level in enumerate([0.0, 0.1, 0.3, 0.2]):
        v[..., t] = level
    s = M.temporal(v)
    np.testing.assert_allclose(s["steps"], [0.1, 0.2, 0.1])
    assert s["step_mean"] == pytest.approx(0.4 / 3) and s["step_max"] == pytest.approx(0.2)
    assert s["closure"] == pytest.approx(0.2) and s["closure_ratio"] == pytest.approx(0.2 / (0.4 / 3))


def test_cardiac_function_by_hand_and_on_a_phantom():
    ed, es = np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 2), np.uint8)
    ed[:2, :2, :] = 3  # 8 voxels
    es[:1, :2, :1] = 3  # 2 voxels
    es[3, 3, 1] = 2  # myocardium is not LV blood pool
    c = M.cardiac_function((2.0, 2.0, 5.0), 3, {"ed": ed, "es": es})
    assert c["edv_ml"] == pytest.approx(8 * 0.02) and c["esv_ml"] == pytest.approx(2 * 0.02)
    assert c["ef_percent"] == pytest.approx(75.0)
    ph = make_cine_phantom(3, shape=(24, 24, 4), n_frames=8, spacing=(6.0, 6.0, 16.0))
    c4 = M.cardiac_function(ph.spacing, 3, labels4d=ph.labels)
    assert c4["ef_percent"] == pytest.approx(ph.ejection_fraction) and c4["edv_ml"] == pytest.approx(ph.edv_ml)
    assert M.cardiac_function((1, 1, 1)) is None


def test_dice_dilation_and_intensity_segmentation():
    assert M.dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert np.isnan(M.dice([0, 0], [0, 0]))
    one = np.zeros((5, 5, 5), bool)
    one[2, 2, 2] = True
    assert M.dilate(one, 1).sum() == 27 and M.dilate(one, 0).sum() == 1
    assert M.dilate(np.stack([one, one], 3), 1).shape == (5, 5, 5, 2)
    img = np.full((8, 8, 8), 0.1)
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    img[1:3, 1:3, 1:3] = 0.8
    img[6:8, 6:8, 6:8] = 0.8  # same intensity, far away: outside the search region
    model = M.IntensityModel(k=2.0, radius=1).fit(img, mask)
    st = model.stats[1]
    assert st["mean"] == pytest.approx(0.8) and st["std"] == pytest.approx(0.0, abs=1e-7) and st["n_voxels"] == 8
    assert M.mask_adherence(img, mask, model) == {1: pytest.approx(1.0)}
    shifted = np.full((8, 8, 8), 0.1)
    shifted[2:4, 1:3, 1:3] = 0.8  # the structure one voxel off: 4 of its 8 voxels overlap, 8 found
    assert M.mask_adherence(shifted, mask, model)[1] == pytest.approx(2 * 4 / (8 + 8))


def test_energy_summary_by_hand(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "energy.json").write_text(json.dumps({"kwh": 1.5, "kg_co2e": 0.6, "seconds": 3, "sessions": [{}, {}]}))
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "summary.json").write_text(json.dumps({"n": 4, "energy": {"kwh": 0.2, "kg_co2e": 0.08,
                                                                         "country": "DEU"}}))
    e = energy_summary([run], [samples])
    assert e["training"]["kwh"] == 1.5 and e["sampling"]["kwh"] == 0.2
    assert e["sampling"]["per_volume"]["kwh"] == pytest.approx(0.05)
    assert e["sampling"]["per_volume"]["driving_km"] == pytest.approx(0.02 * 1000 / 120.4)
    assert e["total"]["kg_co2e"] == pytest.approx(0.68)
    assert e["total"]["per_volume_including_training"]["kwh"] == pytest.approx(1.7 / 4)
    assert e["driving_factor_g_co2e_per_km"] == 120.4 and "Latent Pollution" in e["driving_factor_source"]
    assert energy_summary([], []) is None
    with pytest.raises(ValueError, match="--train-run"):
        energy_summary([tmp_path], [])


def test_medicalnet_checkpoint_features(tmp_path):
    from monai.networks.nets import resnet10

    from medgen_rt.evaluation.features import PretrainedExtractor

    # MedicalNet's layout: 7^3 stride-2 stem, A shortcuts, no bias in the downsampling
    net = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_stride=2, shortcut_type="A", bias_downsample=False,
                   feed_forward=False)
    # MedicalNet files are DataParallel state dicts: every key starts with "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "resnet_10.pth")
    ex = PretrainedExtractor("medicalnet", tmp_path / "resnet_10.pth")
    vol = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    f = ex(vol)
    net.eval()
    with torch.no_grad():
        body = vol[vol > vol.min()]
        want = net(torch.from_numpy((vol - body.mean()) / body.std())[None, None]).double()[0].numpy()
    assert f.shape == (512,) and np.allclose(f, want, atol=1e-5)


def test_radimagenet_checkpoint_features(tmp_path):
    from monai.networks.nets import resnet18

    from medgen_rt.evaluation.features import PretrainedExtractor

    # torchvision key layout (RadImageNet's PyTorch ResNets): stride-2 7x7 stem, B shortcuts
    net = resnet18(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, shortcut_type="B", bias_downsample=False,
                   feed_forward=False).eval()
    torch.save(net.state_dict(), tmp_path / "radimagenet_resnet18.pt")
    ex = PretrainedExtractor("radimagenet", tmp_path / "radimagenet_resnet18.pt")
    vol = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        want = np.mean([net(torch.from_numpy(((np.repeat(vol[None, :, :, z], 3, 0) - mean[:, None, None])
                                              / std[:, None, None]).astype(np.float32))[None]).double()[0].numpy()
                        for z in range(3)], axis=0)
    assert np.allclose(ex(vol), want, atol=1e-5)
