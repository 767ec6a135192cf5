"""Sampling runtime: medgen_rt.sample() (api.py), the memory planner (planner.py),
streamed and tiled decoding (decode.py), summary.json (summary.py). Only summary
is torch-free; the ONNX engine (medgen_rt.export.engine) shares it."""
