"""Sampling runtime: denoising loops, low-VRAM tiled decoding, outputs.
(The `medgen_rt.sample(...)` API and `medgen sample` come with the sampling issue.)"""
