"""DICOM output (medgen_rt.io.dicom): generated CT and cine MR read back with pydicom and
SimpleITK to the NIfTI's voxels (HU exactly for CT) and geometry (RAS -> LPS, within 1e-4),
the conditioning mask as a SEG that reads back to the mask, every object marked synthetic and
free of anything from training data, reproducible UIDs, and the CLI verbs that write DICOM
(`medgen sample --format`, `medgen export dicom`, `medgen share --format`)."""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")

import medgen_rt  # noqa: E402
from medgen_rt.io.dicom import PRIVATE, PRIVATE_CREATOR, PRIVATE_GROUP, export_samples, write_dicom  # noqa: E402
from medgen_rt.io.outputs import write_generated  # noqa: E402

from cli_run import assert_clean_error, medgen  # noqa: E402

# a "training subject" whose name and folder must never reach a DICOM tag
SUBJECT = "JaneDoe4711"
GEOMETRY_TOL = 1e-4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A CT sample of the embedded CT model conditioned on a phantom mask filed under a patient's
    name, and a cine sample of the embedded default model, both as NIfTI + DICOM."""
    from medgen_rt.data.phantoms import write_ct_dataset

    root = tmp_path_factory.mktemp("dicom")
    write_ct_dataset(root / f"hospital_{SUBJECT}", 1, seed=5, quiet=True, shape=(64, 64, 32), spacing=(2.8, 2.8, 4.0))
    mask = root / f"hospital_{SUBJECT}" / "masks" / "ct_001.nii.gz"
    medgen_rt.sample("ct", n=1, seed=7, steps=2, masks=mask, energy=False, out=root / "ct", format="nifti+dicom")
    medgen_rt.sample("default", n=1, seed=3, steps=2, energy=False, out=root / "cine", format="nifti+dicom")
    return root


def _images(folder: Path) -> dict:
    """{temporal position: [datasets sorted by instance number]} of the image objects in a folder."""
    groups: dict = {}
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if ds.Modality in ("CT", "MR"):
            groups.setdefault(int(ds.get("TemporalPositionIdentifier", 1)), []).append((f, ds))
    return {t: sorted(v, key=lambda fd: int(fd[1].InstanceNumber)) for t, v in groups.items()}


def _lps(affine) -> tuple:
    """(origin, spacing, direction) of a NIfTI (RAS) affine in DICOM/ITK (LPS) terms."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    return a[:3, 3], spacing, a[:3, :3] / spacing


def _sitk_series(files) -> "sitk.Image":
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()


def _geometry_error(image, affine) -> float:
    origin, spacing, direction = _lps(affine)
    return max(np.abs(np.array(image.GetOrigin()) - origin).max(),
               np.abs(np.array(image.GetSpacing()) - spacing).max(),
               np.abs(np.array(image.GetDirection()).reshape(3, 3) - direction).max())


def _pydicom_geometry_error(datasets, affine) -> float:
    origin, spacing, direction = _lps(affine)
    errors = []
    for k, ds in enumerate(datasets):
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        errors.append(np.abs(ipp - (origin + k * spacing[2] * direction[:, 2])).max())
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        errors.append(np.abs(iop - np.concatenate([direction[:, 0], direction[:, 1]])).max())
        # Pixel Spacing is (between rows, between columns) = (j, i)
        errors.append(np.abs(np.array(ds.PixelSpacing, dtype=float) - spacing[[1, 0]]).max())
        errors.append(abs(float(ds.SliceThickness) - spacing[2]))
        errors.append(abs(float(ds.SpacingBetweenSlices) - spacing[2]))
    return max(errors)


def _values(ds) -> np.ndarray:
    from pydicom.pixels import apply_rescale

    return apply_rescale(ds.pixel_array, ds)


def test_ct_round_trip_hu_and_geometry(made):
    img = nib.load(str(made / "ct" / "sample_000.nii.gz"))
    hu, affine = np.asarray(img.dataobj), img.affine
    assert hu.dtype == np.int16
    series = _images(made / "ct" / "sample_000_dicom")
    files, datasets = zip(*series[1])
    assert len(datasets) == hu.shape[2] and all(ds.SOPClassUID == pydicom.uid.CTImageStorage for ds in datasets)
    assert {ds.RescaleType for ds in datasets} == {"HU"}
    # pydicom: stored values through Rescale Slope/Intercept are the NIfTI's HU, exactly
    volume = np.stack([_values(ds).T for ds in datasets], axis=2)
    np.testing.assert_array_equal(volume, hu)
    assert _pydicom_geometry_error(datasets, affine) < GEOMETRY_TOL
    # SimpleITK (GDCM) on the series, as a PACS-side tool would read it
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(made / "ct" / "sample_000_dicom"),
                                                          datasets[0].SeriesInstanceUID)
    assert len(names) == hu.shape[2]
    image = _sitk_series(names)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), hu)
    assert _geometry_error(image, affine) < GEOMETRY_TOL
    # and SimpleITK's own reading of the NIfTI agrees with its reading of the DICOM series
    ref = sitk.ReadImage(str(made / "ct" / "sample_000.nii.gz"))
    assert np.allclose(ref.GetOrigin(), image.GetOrigin(), atol=GEOMETRY_TOL)
    assert np.allclose(ref.GetDirection(), image.GetDirection(), atol=GEOMETRY_TOL)


def test_cine_round_trip_values_geometry_and_timing(made):
    img = nib.load(str(made / "cine" / "sample_000.nii.gz"))
    cine, affine = np.asarray(img.get_fdata(dtype=np.float32)), img.affine
    frame = json.loads((made / "cine" / "sample_000.json").read_text())["frame_duration_s"]
    series = _images(made / "cine" / "sample_000_dicom")
    X, Y, Z, T = cine.shape
    assert sorted(series) == list(range(1, T + 1))
    for t, items in series.items():
        files, datasets = zip(*items)
        assert len(datasets) == Z
        slope = float(datasets[0].RescaleSlope)
        assert slope < 2e-5  # uint16 over the volume's range: values within slope / 2
        want = cine[..., t - 1]
        got = np.stack([_values(ds).T for ds in datasets], axis=2)
        assert np.abs(got - want).max() <= slope / 2 + 1e-7
        assert _pydicom_geometry_error(datasets, affine) < GEOMETRY_TOL
        image = _sitk_series(files)
        assert np.abs(sitk.GetArrayFromImage(image).transpose(2, 1, 0) - want).max() <= slope / 2 + 1e-7
        assert _geometry_error(image, affine) < GEOMETRY_TOL
        for ds in datasets:  # the temporal dimension: position, count, time after the R wave in ms
            assert int(ds.TemporalPositionIdentifier) == t and int(ds.NumberOfTemporalPositions) == T
            assert float(ds.TriggerTime) == pytest.approx(1000.0 * (t - 1) * frame, abs=1e-3)
            assert ds.ScanOptions == "CG"


def test_seg_reads_back_to_the_mask(made):
    mask = np.asarray(nib.load(str(made / "ct" / "sample_000_mask.nii.gz")).dataobj)
    folder = made / "ct" / "sample_000_dicom"
    seg = hd.seg.segread(folder / "SEG.dcm")
    _, datasets = zip(*_images(folder)[1])
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    # every frame refers to one of the image slices
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {ds.SOPInstanceUID for ds in datasets}
    numbers = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], combine_segments=True)
    value = {d.SegmentNumber: int(d.SegmentLabel.split()[-1]) for d in seg.SegmentSequence}
    lut = np.zeros(max(value) + 1, dtype=np.int64)
    for n, v in value.items():
        lut[n] = v
    np.testing.assert_array_equal(lut[numbers].transpose(2, 1, 0), mask)
    assert sorted(value.values()) == sorted(int(v) for v in np.unique(mask) if v)


def test_objects_pass_pydicom_highdicom_and_dciodvfy(made):
    import subprocess

    from pydicom.dataset import validate_file_meta

    ct = made / "ct" / "sample_000_dicom"
    cine = made / "cine" / "sample_000_dicom"
    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE  # pydicom: every value valid for its VR, or raise
    try:
        for f in list(ct.glob("*.dcm")) + list(cine.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            validate_file_meta(ds.file_meta, enforce_standard=True)
            for elem in ds.iterall():  # converting each raw value validates it
                assert elem.value is not None or elem.VR != "UI", (f.name, elem.tag)
    finally:
        settings.reading_validation_mode = before
    # highdicom: the SEG parses as one, and each image series converts to a consistent
    # (legacy converted) enhanced multi-frame image, which checks study, series and geometry
    hd.seg.segread(ct / "SEG.dcm")
    _, ct_sets = zip(*_images(ct)[1])
    hd.legacy.LegacyConvertedEnhancedCTImage(list(ct_sets), series_instance_uid=hd.UID(), series_number=9,
                                             sop_instance_uid=hd.UID(), instance_number=1)
    mr_sets = [ds for items in _images(cine).values() for _, ds in items]
    hd.legacy.LegacyConvertedEnhancedMRImage(mr_sets, series_instance_uid=hd.UID(), series_number=9,
                                             sop_instance_uid=hd.UID(), instance_number=1)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed; pydicom and highdicom checks passed")
    for f in (ct / "CT_0001.dcm", ct / "SEG.dcm", cine / "MR_t002_z003.dcm"):
        proc = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (f.name, errors)


def _all_values(ds) -> list:
    """(tag, VR, value as text) of every element, nested sequences and private blocks included."""
    out = []
    for elem in ds.iterall():
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN", "SQ"):
            continue
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        out.extend((elem.tag, elem.VR, "" if v is None else str(v)) for v in values)
    return out


def _assert_synthetic_and_clean(folder: Path, forbidden: list, model: str, seed) -> int:
    today = datetime.date.today().strftime("%Y%m%d")
    n = 0
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        n += 1
        assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientID.startswith("SYN-"), f
        assert ds.ImageType[0] == "DERIVED" and "SYNTHETIC" in ds.SeriesDescription, f
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[PRIVATE["synthetic"]].value == "SYNTHETIC"
        assert block[PRIVATE["model"]].value == model and block[PRIVATE["seed"]].value == str(seed)
        assert "medgen_rt" in block[PRIVATE["version"]].value
        if ds.Modality != "SEG":
            assert "SYNTHETIC" in ds.DerivationDescription and "SYNTHETIC" in ds.ImageComments
        for tag, vr, text in _all_values(ds):
            for bad in forbidden:
                assert bad.lower() not in text.lower(), (f.name, tag, text, bad)
            if vr in ("DA", "DT"):  # no date but the day the object was made (the SEG's content date)
                assert text in ("", today) or text.startswith(today), (f.name, tag, text)
        assert "PatientBirthDate" not in ds or ds.PatientBirthDate == ""
    return n


def test_every_object_is_marked_synthetic_and_carries_nothing_from_training_data(made, tmp_path):
    forbidden = [SUBJECT, "hospital", "ct_001", str(made)]
    assert _assert_synthetic_and_clean(made / "ct" / "sample_000_dicom", forbidden, "ct-tiny", 7) == 33
    assert _assert_synthetic_and_clean(made / "cine" / "sample_000_dicom", forbidden, "cmr4d-tiny", 3) == 8 * 16
    # a sidecar holding identifying keys (paths, notes) contributes only the sample's settings
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in ("sample_000.nii.gz", "sample_000_mask.nii.gz"):
        shutil.copy(made / "ct" / name, planted / name)
    side = json.loads((made / "ct" / "sample_000.json").read_text())
    side.update({"model": f"/data/{SUBJECT}/runs/ct-model", "preset": None, "mask": f"/data/{SUBJECT}/mask.nii.gz",
                 "notes": f"trained on patient {SUBJECT}, scanned 2019-03-04", "data": f"/hospital/{SUBJECT}"})
    (planted / "sample_000.json").write_text(json.dumps(side))
    export_samples(planted, tmp_path / "out")
    # the planted scan date in the forms DICOM and notes write it; a bare "2019" also turns up by
    # chance in the hashed digits of a UID (it did, once the CT default changed its voxels)
    _assert_synthetic_and_clean(tmp_path / "out" / "sample_000_dicom", forbidden + ["2019-03-04", "20190304"],
                                "ct-model", 7)


def _uids(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[f.name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID)
    return out


def test_uids_are_reproducible_and_differ_between_volumes(made, tmp_path):
    # `medgen export dicom` of the NIfTI + sidecar gives the UIDs `medgen sample --format` gave
    proc = medgen("export", "dicom", made / "ct", "--out", tmp_path / "ct")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sampled = _uids(made / "ct" / "sample_000_dicom")
    assert _uids(tmp_path / "ct" / "sample_000_dicom") == sampled
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["sample_000_dicom"]  # no temporary left
    study, series, frame_of_reference, _ = sampled["CT_0001.dcm"]
    assert len({study, series, frame_of_reference}) == 3
    assert len({u[3] for u in sampled.values()}) == len(sampled)  # one SOP Instance UID per object
    # another volume (the cine) shares none of them
    cine = {u for v in _uids(made / "cine" / "sample_000_dicom").values() for u in v}
    assert cine.isdisjoint({u for v in sampled.values() for u in v})
    # the same voxels with another seed recorded are another object
    vol = nib.load(str(made / "ct" / "sample_000.nii.gz"))
    a = write_dicom(tmp_path / "a", np.asarray(vol.dataobj), vol.affine, "ct", {"seed": 1, "model": "m"})
    b = write_dicom(tmp_path / "b", np.asarray(vol.dataobj), vol.affine, "ct", {"seed": 2, "model": "m"})
    assert _uids(a)["CT_0001.dcm"][0] != _uids(b)["CT_0001.dcm"][0]


def test_export_dicom_bad_input_is_one_line_and_writes_nothing(made, tmp_path):
    proc = medgen("export", "dicom", tmp_path / "missing", "--out", tmp_path / "o1")
    assert_clean_error(proc, "medgen export: error:", "SAMPLES_DIR", "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = medgen("export", "dicom", empty, "--out", tmp_path / "o2")
    assert_clean_error(proc, "holds no generated volumes")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    proc = medgen("export", "dicom", made / "cine", "--out", busy)
    assert_clean_error(proc, "--out", "not an empty folder")
    # a broken image among good ones: the error names it, and no output folder appears
    bad = tmp_path / "bad"
    shutil.copytree(made / "cine", bad, ignore=shutil.ignore_patterns("*_dicom"))
    shutil.copy(bad / "sample_000.json", bad / "sample_001.json")
    side = json.loads((bad / "sample_001.json").read_text())
    side["files"]["image"] = "sample_001.nii.gz"
    (bad / "sample_001.json").write_text(json.dumps(side))
    (bad / "sample_001.nii.gz").write_bytes((bad / "sample_000.nii.gz").read_bytes()[:500])
    proc = medgen("export", "dicom", bad, "--out", tmp_path / "o3")
    assert_clean_error(proc, "sample_001.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "busy", "empty"]


@pytest.mark.filterwarnings("ignore:.*shear")  # the NIfTI writer's warning, before the DICOM writer refuses
def test_unusable_geometry_is_refused_and_left_handed_grids_keep_every_voxel_in_place(tmp_path):
    vol = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3) * 10 - 300
    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="perpendicular"):
        write_generated(tmp_path, "sample_000", vol, sheared, "ct", {"seed": 0}, formats=frozenset({"nifti", "dicom"}))
    assert list(tmp_path.iterdir()) == []  # neither the NIfTI nor a half DICOM folder
    # a left-handed voxel grid: readers order the slices along the normal (k reversed), the
    # world position of every voxel and its value stay what the NIfTI says
    left = np.diag([1.5, 2.0, -3.0, 1.0])
    left[:3, 3] = [10, -20, 30]
    folder = write_dicom(tmp_path / "left", vol, left, "ct", {"seed": 0})
    image = _sitk_series(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ left
    for i, j, k in [(0, 0, 0), (3, 4, 2), (1, 2, 1)]:
        world = (lps @ [i, j, k, 1])[:3]
        index = image.TransformPhysicalPointToIndex(world.tolist())
        assert np.allclose(image.TransformIndexToPhysicalPoint(index), world, atol=GEOMETRY_TOL)
        assert arr[index] == vol[i, j, k]


def test_sample_format_dicom_and_overwrite(tmp_path):
    out = tmp_path / "s"
    proc = medgen("sample", "--format", "dicom", "--steps", "1", "--no-energy", "--quiet", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.gif", "sample_000.json", "sample_000.png",
                                                      "sample_000_dicom", "summary.json"]
    side = json.loads((out / "sample_000.json").read_text())
    assert side["files"]["dicom"] == "sample_000_dicom" and "image" not in side["files"]
    assert len(list((out / "sample_000_dicom").glob("MR_*.dcm"))) == 8 * 16
    # an earlier run's DICOM folder is one of its outputs: refused, or removed with --overwrite
    proc = medgen("sample", "--steps", "1", "--no-energy", "--quiet", "--out", out)
    assert_clean_error(proc, "earlier sampling run")
    proc = medgen("sample", "--steps", "1", "--no-energy", "--quiet", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sample_000_dicom" not in {p.name for p in out.iterdir()}
    proc = medgen("sample", "--format", "png", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "--format" in proc.stderr


def test_share_writes_dicom_carrying_the_gate_verdict(made, tmp_path):
    from medgen_rt.evaluation.datasets import open_set
    from medgen_rt.evaluation.share import gate

    syn = tmp_path / "syn"
    shutil.copytree(made / "ct", syn, ignore=shutil.ignore_patterns("*_dicom"))
    s = open_set(syn, "--synthetic")
    report = {"synthetic": [{"name": "sample_000", "is_copy": False, "r": 0.4321}], "copy_share": 0.0,
              "threshold": 0.9}
    info = gate(report, s, tmp_path / "shared", formats=frozenset({"dicom"}))
    assert info["shared"] == ["sample_000"]
    shared = tmp_path / "shared"
    assert sorted(p.name for p in shared.iterdir()) == ["sample_000.json", "sample_000.png", "sample_000_dicom"]
    side = json.loads((shared / "sample_000.json").read_text())
    assert "not a copy" in side["sharing"]["verdict"] and side["files"]["dicom"] == "sample_000_dicom"
    for f in (shared / "sample_000_dicom").glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        verdict = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[PRIVATE["verdict"]].value
        assert "not a copy" in verdict and "0.4321" in verdict
    assert (shared / "sample_000_dicom" / "SEG.dcm").is_file()  # the sample's own (fresh) mask
    _assert_synthetic_and_clean(shared / "sample_000_dicom", [SUBJECT, "hospital", str(made)], "ct-tiny", 7)
