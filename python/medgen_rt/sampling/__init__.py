"""Sampling runtime: medgen_rt.sample() and the torch adapters (api.py), the pipeline both
runtimes run (pipeline.py), the model spec and shared input checks (spec.py), the memory planner
(planner.py), streamed and tiled decoding (decode.py), summary.json (summary.py). spec, pipeline
and summary are torch-free; the ONNX engine (medgen_rt.export.engine) shares them."""
