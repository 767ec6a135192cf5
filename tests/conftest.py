import os

import pytest

# Without a GPU, Triton kernels can only run in Triton's interpreter; it must be
# switched on before triton is first imported. On a GPU machine leave it off so
# the Triton tests exercise the real kernels.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: on 2 shared cores the OpenMP threads of small
    convolutions wait on each other, and one thread trains the copy encoder ~20x faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory):
    """Copy encoders the tests train are cached in a temporary folder, never in the user's
    ~/.cache (evaluation.encoder.cache_dir reads MEDGEN_CACHE; subprocesses inherit it)."""
    before = os.environ.get("MEDGEN_CACHE")
    os.environ["MEDGEN_CACHE"] = str(tmp_path_factory.mktemp("medgen_cache"))
    yield os.environ["MEDGEN_CACHE"]
    if before is None:
        os.environ.pop("MEDGEN_CACHE", None)
    else:
        os.environ["MEDGEN_CACHE"] = before
