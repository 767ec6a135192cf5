"""Training: one loop (loop.py) for every task (tasks.py, vae.py), run folders
and checkpoints (checkpoint.py), DDP (distributed.py), presets (config.py).

`torchrun --nproc-per-node N -m medgen_rt.train dit --config ... ` is the same
command line as `medgen train dit ...`."""
