"""Runtime helpers shared by training, sampling and the ONNX engine: energy
metering, memory and tiling (planner), device selection."""
