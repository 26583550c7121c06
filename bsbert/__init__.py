"""bsbert: fast kernels for pruned BERT models.

    import bsbert
    report = bsbert.analyze(model)     # heads/neurons kept, densities, FLOP bound
    bsbert.patch(model)                # in place; print(model) shows the swapped modules
    bsbert.unpatch(model)              # back to the original modules
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
