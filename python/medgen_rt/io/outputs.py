"""The files of one generated volume, written together or not at all:

    NAME.nii.gz       CT: int16 HU (scl_slope 1, scl_inter 0); cine: float32 (X, Y, Z, T)
    NAME_mask.nii.gz  the conditioning mask, when the sample was conditioned
    NAME.json         sidecar: model, seed, sampler, steps, guidance, timings, memory, energy, files
    NAME.png          preview (CT: orthogonal mid-slices; cine: slice x frame montage)
    NAME.gif          cine only: all slices over the cycle
    NAME_dicom/       with the dicom format: the CT or MR series and the mask as DICOM SEG
                      (medgen_rt.io.dicom), all marked synthetic

formats: "nifti" (the default), "dicom" (no NIfTI files) or both ("nifti+dicom"; see
io.dicom.parse_format). A cine's frame duration (seconds) goes into pixdim[4], the sidecar
("frame_duration_s", null with a note when the model does not know it) and the DICOM
Trigger Times.

numpy, nibabel and Pillow (and pydicom/highdicom for DICOM) only, so the torch runtime
and the ONNX engine write identical outputs. A sampling run's folder is an OutputFolder: locked for the run,
cleared of the temporary files of killed runs, and never mixed with an earlier run's
samples.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .atomic import check_out, temp_sibling
from .nifti import spacing_from_affine, write_volume
from .preview import write_ct_preview, write_cine_gif, write_cine_montage
from .sidecar import write_json_atomic

MODALITIES = ("ct", "cmr")
NIFTI_ONLY = frozenset({"nifti"})
log = logging.getLogger(__name__)


def frame_timing(frame_duration: Optional[float]) -> dict:
    """The sidecar keys of a cine's frame duration: seconds, or null with why (never 0)."""
    if frame_duration:
        return {"frame_duration_s": float(frame_duration)}
    return {"frame_duration_s": None,
            "frame_duration_note": "unknown: the model does not record the frame duration of its training data "
                                   "(trained before medgen_rt recorded it); NIfTI pixdim[4] is 0 (unknown)"}


def write_generated(out_dir, name: str, volume: np.ndarray, affine: np.ndarray, modality: str, metadata: dict,
                    mask: Optional[np.ndarray] = None, frame_duration: Optional[float] = None,
                    formats: frozenset = NIFTI_ONLY, verdict: Optional[str] = None) -> dict:
    """Writes a generated volume's files (see the module docstring); returns {kind: path}.

    volume: CT (X, Y, Z) in HU, or cine (X, Y, Z, T) float. The files are written into a
    hidden staging folder next to their place and renamed in, the sidecar last: a volume
    whose sidecar exists is complete. If any file fails, none is left and the error is
    raised; a killed writer leaves only the staging folder (OutputFolder removes it).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    volume = np.asarray(volume)
    want = 3 if modality == "ct" else 4
    if volume.ndim != want:
        raise ValueError(f"{name}: a {modality} volume must be {want}-D, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{name}: the generated volume has non-finite values; nothing was written")
    if not formats or not set(formats) <= {"nifti", "dicom"}:
        raise ValueError(f"formats: expected nifti and/or dicom, got {sorted(formats)}")
    frame_duration = frame_duration if modality == "cmr" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spacing = spacing_from_affine(affine)
    # the temporary name of medgen_rt.io.atomic, so that one pattern (RUN_TEMP) finds both
    stage = temp_sibling(out / name, f"{os.getpid()}-{secrets.token_hex(4)}")
    staged: dict = {}
    moved: list = []
    try:
        stage.mkdir()
        if "nifti" in formats:
            staged["image"] = write_volume(stage / f"{name}.nii.gz", volume, affine,
                                           kind="ct" if modality == "ct" else "mr", frame_duration=frame_duration)
            if mask is not None:
                staged["mask"] = write_volume(stage / f"{name}_mask.nii.gz", mask, affine, kind="label")
        if "dicom" in formats:
            from .dicom import dicom_folder_name, write_dicom

            # one folder, renamed into place like the files: its objects appear together
            staged["dicom"] = write_dicom(stage / dicom_folder_name(name), volume, affine, modality, metadata,
                                          mask=mask, frame_duration=frame_duration, verdict=verdict)
        if modality == "ct":
            staged["preview"] = write_ct_preview(stage / f"{name}.png", volume, affine)
        else:
            staged["preview"] = write_cine_montage(stage / f"{name}.png", volume, affine)
            staged["animation"] = write_cine_gif(stage / f"{name}.gif", volume, affine, frame_duration)
        sidecar = {**metadata, "modality": modality, "shape": list(volume.shape),
                   "spacing_mm": [round(s, 6) for s in spacing],
                   **(frame_timing(frame_duration) if modality == "cmr" else {}),
                   "files": {k: Path(p).name for k, p in staged.items()}}
        staged["sidecar"] = write_json_atomic(stage / f"{name}.json", sidecar)
        for path in staged.values():  # the sidecar last (dicts keep their order)
            os.replace(path, out / Path(path).name)
            moved.append(out / Path(path).name)
    except BaseException:
        for path in moved:
            _remove(path)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {k: out / Path(v).name for k, v in staged.items()}


def _remove(path: Path) -> None:
    """A file, or a folder (NAME_dicom/), gone; a link is removed, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# What a sampling run writes into its folder, and the hidden temporary names its writers use
# (medgen_rt.io.atomic: .NAME.<pid>-<8 hex>.tmp[SUFFIX]; write_generated's staging folders).
RUN_FILE = re.compile(r"sample_\d{3,}(?:_mask\.nii\.gz|\.nii\.gz|\.json|\.png|\.gif|_dicom)|summary\.json")
RUN_TEMP = re.compile(r"\.(?:sample_\d{3,}(?:_mask)?|summary)\.\d+-[0-9a-f]{8}\.tmp(?:\..+)?")
LOCK_NAME = ".medgen.lock"


class OutputFolder:
    """The output folder of one sampling run (torch runtime and ONNX engine alike).

    open() (called by the sampler after its cheap input checks, so bad input leaves no
    folder): creates the folder, checks it is writable, takes an exclusive lock on
    FOLDER/.medgen.lock for the run (a second run into it fails naming `arg`), refuses a
    folder that holds an earlier run's samples (sample_NNN.*, summary.json) unless
    `overwrite`, which removes exactly those files first, and removes the temporary files
    of killed runs. So the folder ends holding exactly this run's outputs. close() (or the
    end of a `with` block) releases the lock.

    Several processes of one torchrun job: only the lead (rank 0) decides and locks; the
    others wait for its answer through share(message) -> rank 0's message (None: go on).
    """

    def __init__(self, path, *, overwrite: bool = False, arg: str = "out", overwrite_arg: str = "overwrite=True",
                 lead: bool = True, share: Optional[Callable[[Optional[str]], Optional[str]]] = None,
                 formats: frozenset = NIFTI_ONLY):
        self.path = Path(path)
        self.formats = frozenset(formats)  # what each volume is written as: nifti and/or dicom
        if "dicom" in self.formats:
            from .dicom import need_libraries

            need_libraries()  # before any sampling
        self.overwrite = overwrite
        self.arg, self.overwrite_arg = arg, overwrite_arg
        self.lead, self.share = lead, share
        self._fd: Optional[int] = None
        self.opened = False

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __fspath__(self) -> str:
        return str(self.path)

    def open(self) -> Path:
        if self.opened:
            return self.path
        if not self.lead:
            message = self.share(None) if self.share else None
            if message:
                raise ValueError(message)
            self.opened = True
            return self.path
        try:
            self._prepare()
        except (ValueError, OSError) as exc:
            self.close()
            if self.share:
                self.share(str(exc))
            raise
        if self.share:
            self.share(None)
        self.opened = True
        return self.path

    def _prepare(self) -> None:
        import tempfile

        where = f"{self.arg} {self.path}"
        check_out(self.path, self.arg)  # a file in the way, read-only, a name too long: said plainly
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # a name of our own: another run may probe the same folder at once
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".medgen_write_test"):
                pass
        except OSError as exc:
            raise ValueError(f"{where}: cannot write there ({exc.strerror or exc})") from None
        self._lock(where)
        names = sorted(p.name for p in self.path.iterdir())
        earlier = [n for n in names if RUN_FILE.fullmatch(n)]
        if earlier and not self.overwrite:
            shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
            raise ValueError(f"{where}: holds the outputs of an earlier sampling run ({shown}); pass "
                             f"{self.overwrite_arg} to replace them, or choose another {self.arg}")
        for name in earlier:
            _remove(self.path / name)
        # under the lock no live run writes here: a temporary name is a killed run's
        for name in names:
            if RUN_TEMP.fullmatch(name):
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)

    def _lock(self, where: str) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rest still holds
            return
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ValueError(f"{where}: another sampling run (pid {holder}) is writing there; wait for it "
                                 f"to finish or choose another {self.arg}") from None
            except OSError as exc:  # a filesystem without locks
                os.close(fd)
                log.warning("%s: cannot lock the folder (%s); not guarded against a second run", where, exc)
                return
            # the run before us may have removed the lock file between our open and our lock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            # removed while still held, so that no other run can lock the old file
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def write(self, name: str, volume, affine, modality: str, metadata: dict, mask=None,
              frame_duration: Optional[float] = None) -> dict:
        self.open()
        return write_generated(self.path, name, volume, affine, modality, metadata, mask=mask,
                               frame_duration=frame_duration, formats=self.formats)
