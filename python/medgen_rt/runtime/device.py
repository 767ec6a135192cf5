"""Which torch device a command runs on (shared by training, encoding and sampling)."""
from __future__ import annotations

import torch


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """auto (a GPU when torch sees one), cpu, cuda (this process's local rank) or cuda:N."""
    if preference in ("auto", None):
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch")
        return torch.device("cuda", local_rank if preference == "cuda" else int(preference.split(":")[1]))
    if preference != "cpu":
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {preference!r}")
    return torch.device("cpu")
