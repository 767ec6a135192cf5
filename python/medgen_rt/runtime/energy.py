"""Energy and CO2 of a run, metered with codecarbon's OfflineEmissionsTracker.

Offline on purpose: the online tracker looks the location up over the network
and silently falls back to a wrong country without it. The country is an ISO
3166-1 alpha-3 code (``--country``, else ``MEDGEN_COUNTRY_ISO``, else DEU).

    meter = EnergyMeter(country="DEU")
    with meter.phase("denoise"):
        ...
    meter.report()  # {"country": "DEU", "kwh": ..., "kg_co2e": ..., "phases": {"denoise": {...}}}
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

DEFAULT_COUNTRY = "DEU"
log = logging.getLogger(__name__)


def default_country() -> str:
    return os.environ.get("MEDGEN_COUNTRY_ISO", DEFAULT_COUNTRY).upper()


@lru_cache(maxsize=1)
def known_countries() -> frozenset:
    """The alpha-3 codes codecarbon's offline tracker has an energy mix for (its
    global_energy_mix.json); empty when codecarbon is not installed."""
    try:
        from importlib import resources

        table = resources.files("codecarbon") / "data" / "private_infra" / "global_energy_mix.json"
        return frozenset(k.upper() for k in json.loads(table.read_text()))
    except (ImportError, OSError, ValueError, TypeError):
        return frozenset()


def _country_problem(text: str) -> str:
    """Why an upper-cased code cannot be used, or "" when it can."""
    if len(text) != 3 or not text.isalpha():
        return "expected an ISO 3166-1 alpha-3 country code such as DEU or USA"
    known = known_countries()
    if known and text not in known:
        return "not a country code codecarbon has an energy mix for (ISO 3166-1 alpha-3, such as DEU, FRA or USA)"
    return ""


def check_country(code: str, arg: str = "--country") -> str:
    """The upper-cased code; ValueError naming ``arg`` for a code that is not alpha-3 or that
    codecarbon has no energy mix for (it would silently use a world-average intensity)."""
    text = (code or "").strip().upper()
    problem = _country_problem(text)
    if problem:
        raise ValueError(f"{arg} {code!r}: {problem}")
    return text


def country_arg(text: str) -> str:
    """argparse type of --country: refused when the command line is read, before any work."""
    import argparse

    problem = _country_problem(text.strip().upper())
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text.strip().upper()


class EnergyMeter:
    """Meters named phases; disabled meters record durations only."""

    def __init__(self, country: Optional[str] = None, enabled: bool = True, output_dir: Optional[str] = None,
                 tracking_mode: str = "process"):
        """tracking_mode: "process" meters this process (one-process runs); "machine"
        meters the whole machine, for runs with several processes on it (DDP)."""
        self.country = check_country(country) if country else check_country(default_country(), "MEDGEN_COUNTRY_ISO")
        self.enabled = enabled
        self.output_dir = output_dir
        self.tracking_mode = tracking_mode
        self.phases: dict = {}

    def _tracker(self, name: str):
        from codecarbon import OfflineEmissionsTracker

        # codecarbon logs at INFO/WARNING on every start; keep our output readable.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        kwargs = dict(country_iso_code=self.country, project_name=f"medgen_rt:{name}", log_level="error",
                      measure_power_secs=5, tracking_mode=self.tracking_mode, allow_multiple_runs=True)
        if self.output_dir:
            kwargs.update(save_to_file=True, output_dir=str(self.output_dir), output_file="emissions.csv")
        else:
            kwargs.update(save_to_file=False)
        return OfflineEmissionsTracker(**kwargs)

    @contextmanager
    def phase(self, name: str):
        tracker = None
        if self.enabled:
            try:
                tracker = self._tracker(name)
                tracker.start()
            except Exception as exc:  # metering must never break the run it meters
                log.warning("energy metering unavailable (%s); continuing without it", exc)
                tracker = None
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            entry = self.phases.setdefault(name, {"seconds": 0.0, "kwh": None, "kg_co2e": None})
            entry["seconds"] += seconds
            if tracker is not None:
                try:
                    kg = tracker.stop() or 0.0
                    kwh = float(tracker.final_emissions_data.energy_consumed)
                    entry["kwh"] = (entry["kwh"] or 0.0) + kwh
                    entry["kg_co2e"] = (entry["kg_co2e"] or 0.0) + float(kg)
                except Exception as exc:
                    log.warning("energy metering failed to stop (%s)", exc)

    def report(self, per: Optional[int] = None) -> dict:
        """Totals and phases; with per=n also the figures per item (e.g. per volume)."""
        metered = [p for p in self.phases.values() if p["kwh"] is not None]
        total = {
            "country": self.country,
            "metered": bool(metered),
            "seconds": sum(p["seconds"] for p in self.phases.values()),
            "kwh": sum(p["kwh"] for p in metered) if metered else None,
            "kg_co2e": sum(p["kg_co2e"] for p in metered) if metered else None,
            "phases": self.phases,
            "tool": "codecarbon OfflineEmissionsTracker",
        }
        if per:
            total["per_item"] = {k: (None if total[k] is None else total[k] / per) for k in ("kwh", "kg_co2e")}
        return total
