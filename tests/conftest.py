import os

# Without a GPU, Triton kernels can only run in Triton's interpreter; it must be
# switched on before triton is first imported. On a GPU machine leave it off so
# the Triton tests exercise the real kernels.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
