"""ONNX export and the torch-free onnxruntime engine (installed as ``medgen_rt.export``).

Not built yet: the exporter and engine arrive with the ONNX issue. Code in this
package must never import torch at module level, so the engine can run where
PyTorch is not installed.
"""
