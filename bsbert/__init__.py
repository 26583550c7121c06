"""bsbert: fast kernels for pruned BERT models.

    import bsbert
    report = bsbert.analyze(model)     # heads/neurons kept, densities, FLOP bound
    bsbert.patch(model)                # in place; print(model) shows the swapped modules
    bsbert.unpatch(model)              # back to the original modules
    with bsbert.nvtx.ranges(model): ...   # named profiler ranges (submodule imported on first use)
"""
from bsbert import _ext

_ext.load(warn=True)

from bsbert.analyze import analyze  # noqa: E402
from bsbert.errors import (AlreadyPatchedError, BsbertError, NotPatchedError,  # noqa: E402
                           UnsupportedModelError)
from bsbert.formats import BlockSparseMatrix  # noqa: E402
from bsbert.patching import is_patched, patch, unpatch  # noqa: E402
from bsbert.plan import Plan  # noqa: E402
from bsbert.serialization import load, save  # noqa: E402
from bsbert.verify import VerifyReport, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = ["analyze", "patch", "save", "load", "unpatch", "is_patched", "verify", "VerifyReport", "Plan", "BlockSparseMatrix", "BsbertError",
           "UnsupportedModelError", "AlreadyPatchedError", "NotPatchedError"]

# Submodules the README uses as attributes after a plain `import bsbert` (`bsbert.nvtx.ranges(model)`,
# `bsbert.packed_export.packed_bert(model)`, ...). They are imported on first access instead of here:
# each pulls in code (transformers' model classes, ctypes, the profiler) that most users of patch()
# never need, and `import bsbert` should stay as fast as it is.
_LAZY_SUBMODULES = ("nvtx", "packed_export", "models", "hugepages", "timing")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds it here: no second call
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
