"""Every bsbert C++ error message is built by BSBERT_CHECK (csrc/check.h), which formats numbers and
shapes without std::ostream: on the lent H200 a TORCH_CHECK that streamed an integer crashed the process
instead of raising (see csrc/check.h). This keeps TORCH_CHECK out of csrc and checks the formatting."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import bsbert  # noqa: F401  (loads the extension)
from bsbert import _ext

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_no_raw_torch_check_in_csrc():
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh") or path.name == "check.h":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(TORCH_CHECK|TORCH_INTERNAL_ASSERT|c10::str)\b", line):
                offenders.append(f"{path.relative_to(CSRC)}:{i}: {line.strip()}")
    assert not offenders, "use BSBERT_CHECK (csrc/check.h) instead:\n" + "\n".join(offenders)


@pytest.mark.skipif(not _ext.has_op("bsr_linear"), reason="extension not built")
def test_messages_carry_numbers_shapes_dtypes():
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 64), 32)
    op = torch.ops.bsbert.bsr_linear
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError) as e:
        op(x[:, :48], bsm.crow_indices, bsm.col_indices, bsm.values, None, 64, 64, 32, False)
    text = str(e.value)
    assert "in_features" in text and "48" in text and "64" in text
    with pytest.raises(RuntimeError) as e:
        op(x.double(), bsm.crow_indices, bsm.col_indices, bsm.values, None, 64, 64, 32, False)
    assert "Double" in str(e.value)


@pytest.mark.skipif(not _ext.has_op("add_layer_norm"), reason="extension not built")
def test_shape_formatting():
    with pytest.raises(RuntimeError, match=r"\[2, 7\].*\[2, 8\]"):
        torch.ops.bsbert.add_layer_norm(torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), torch.zeros(8), 1e-5)
