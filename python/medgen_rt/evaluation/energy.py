"""Energy and CO2 of the runs behind a synthetic set, for the reports.

Training runs (``medgen train``) keep ``energy.json`` (kWh and kg CO2e summed over
sessions); sample folders (``medgen sample``) keep ``summary.json`` with the run's energy,
or at least each volume's sidecar with its share (``energy.per_volume``).

The driving distance follows the Latent Pollution Model paper (Seyfarth et al. 2024),
which reports emissions as kilometres driven by car through Carbontracker's conversion:
120.4 g CO2e per km, the EEA average of new passenger cars registered in the EU in 2018.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["CAR_G_CO2E_PER_KM", "CAR_FACTOR_SOURCE", "training_energy", "sampling_energy", "energy_summary"]

CAR_G_CO2E_PER_KM = 120.4
CAR_FACTOR_SOURCE = ("120.4 g CO2e per km: EEA average of new passenger cars in the EU (2018), Carbontracker's "
                     "conversion, as used to express emissions as driving distance in the Latent Pollution Model "
                     "paper (Seyfarth et al. 2024)")


def _read(path: Path, arg: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{arg}: cannot read {path} ({exc})") from exc


def training_energy(run_dir, arg: str = "--train-run") -> dict:
    """A training run's totals from its energy.json: kwh and kg_co2e (None when unmetered)."""
    run = Path(run_dir)
    path = run / "energy.json"
    if not path.is_file():
        raise ValueError(f"{arg}: {run} has no energy.json (is it a `medgen train` run folder?)")
    e = _read(path, arg)
    return {"run": str(run), "kwh": e.get("kwh"), "kg_co2e": e.get("kg_co2e"), "seconds": e.get("seconds"),
            "country": e.get("country"), "sessions": len(e.get("sessions", []))}


def sampling_energy(sample_dir, arg: str = "--sample-run") -> Optional[dict]:
    """A sample folder's totals: from summary.json, else the sum of the sidecars' per-volume shares.
    None when the folder holds neither (e.g. real data)."""
    d = Path(sample_dir)
    summary = d / "summary.json"
    if summary.is_file():
        s = _read(summary, arg)
        e = s.get("energy") or {}
        return {"folder": str(d), "n_volumes": s.get("n"), "kwh": e.get("kwh"), "kg_co2e": e.get("kg_co2e"),
                "country": e.get("country"), "source": "summary.json"}
    kwh = kg = 0.0
    n = metered = 0
    country = None
    for p in sorted(d.glob("*.json")):
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        e = meta.get("energy") if isinstance(meta, dict) else None
        if not isinstance(e, dict):
            continue
        n += 1
        country = country or e.get("country")
        per = e.get("per_volume") or {}
        if per.get("kwh") is not None:
            metered += 1
            kwh += float(per["kwh"])
            kg += float(per.get("kg_co2e") or 0.0)
    if n == 0:
        return None
    return {"folder": str(d), "n_volumes": n, "kwh": kwh if metered else None, "kg_co2e": kg if metered else None,
            "country": country, "source": "volume sidecars"}


def _km(kg: Optional[float], g_per_km: float) -> Optional[float]:
    return None if kg is None else kg * 1000.0 / g_per_km


def _total(items: list, key: str) -> Optional[float]:
    vals = [i[key] for i in items if i.get(key) is not None]
    return sum(vals) if vals else None


def energy_summary(train_runs: Sequence = (), sample_dirs: Sequence = (), g_per_km: float = CAR_G_CO2E_PER_KM,
                   quiet_missing: bool = False) -> Optional[dict]:
    """Totals of training and sampling, per generated volume, and the driving equivalent.

    Returns None when nothing was given (or, with ``quiet_missing``, nothing was found).
    """
    training = [training_energy(r) for r in train_runs]
    sampling = [s for s in (sampling_energy(d) for d in sample_dirs) if s is not None]
    if not sample_dirs and not train_runs:
        return None
    if not training and not sampling:
        if quiet_missing:
            return None
        raise ValueError(f"--sample-run: no summary.json or sidecars with energy in {', '.join(map(str, sample_dirs))}")
    n_vol = sum(int(s.get("n_volumes") or 0) for s in sampling)
    t_kwh, t_kg = _total(training, "kwh"), _total(training, "kg_co2e")
    s_kwh, s_kg = _total(sampling, "kwh"), _total(sampling, "kg_co2e")
    all_kwh = None if t_kwh is None and s_kwh is None else (t_kwh or 0.0) + (s_kwh or 0.0)
    all_kg = None if t_kg is None and s_kg is None else (t_kg or 0.0) + (s_kg or 0.0)

    def per(v):
        return None if v is None or not n_vol else v / n_vol

    return {
        "training": {"runs": training, "kwh": t_kwh, "kg_co2e": t_kg, "driving_km": _km(t_kg, g_per_km)},
        "sampling": {"folders": sampling, "n_volumes": n_vol, "kwh": s_kwh, "kg_co2e": s_kg,
                     "driving_km": _km(s_kg, g_per_km), "per_volume": {"kwh": per(s_kwh), "kg_co2e": per(s_kg),
                                                                        "driving_km": _km(per(s_kg), g_per_km)}},
        "total": {"kwh": all_kwh, "kg_co2e": all_kg, "driving_km": _km(all_kg, g_per_km),
                  "per_volume_including_training": {"kwh": per(all_kwh), "kg_co2e": per(all_kg)}},
        "driving_factor_g_co2e_per_km": g_per_km,
        "driving_factor_source": CAR_FACTOR_SOURCE if g_per_km == CAR_G_CO2E_PER_KM else "given by the user",
        "metering": "codecarbon OfflineEmissionsTracker (medgen train / medgen sample)",
    }
