"""CT mask adherence of a folder of mask-conditioned samples: blood and myocardium Dice (HU ranges,
`evaluation.metrics.ct_mask_adherence`) against each sample's own map and, as the control, the next
sample's map. Writes SAMPLES/dice.json and prints the means.

    python bench/ct_dice.py SAMPLES_DIR
"""
import glob
import json
import sys

import nibabel as nib
import numpy as np

from medgen_rt.evaluation.metrics import ct_mask_adherence


def main(folder: str) -> dict:
    images = sorted(p for p in glob.glob(f"{folder}/sample_*.nii.gz") if not p.endswith("_mask.nii.gz"))
    if len(images) < 2:
        raise SystemExit(f"{folder}: needs at least 2 mask-conditioned samples")
    maps = [np.asarray(nib.load(p.replace(".nii.gz", "_mask.nii.gz")).dataobj) for p in images]
    own, swapped = [], []
    for i, p in enumerate(images):
        hu = nib.load(p).get_fdata()
        own.append(ct_mask_adherence(hu, maps[i]))
        swapped.append(ct_mask_adherence(hu, maps[(i + 1) % len(images)]))
    out = {k: {g: float(np.mean([r[g] for r in v])) for g in ("blood", "myocardium")}
           for k, v in (("own", own), ("swapped", swapped))}
    out["per_volume"] = {"own": own, "swapped": swapped}
    with open(f"{folder}/dice.json", "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(json.dumps({k: out[k] for k in ("own", "swapped")}))
    return out


if __name__ == "__main__":
    main(sys.argv[1])
