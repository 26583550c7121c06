"""Test-wide setup. Triton kernels run on CPU through the interpreter when there is no GPU: the variable
must be set before triton is first imported, so it is set here, before any test module imports bsbert."""
import os

import pytest

try:  # cheap check that does not initialise CUDA in a way that matters
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU, autotuning every test shape would compile and benchmark ~12 configs per shape (minutes);
    # tests check numbers, so they run one fixed config per shape (benchmarks keep autotuning).
    os.environ.setdefault("BSBERT_TRITON_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
