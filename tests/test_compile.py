"""torch.compile of a patched model runs and matches the masked dense model."""
import pytest
import torch

import bsbert
from bsbert.ops.linear_backends import BACKENDS
from tests.helpers import inputs, rel_err, tiny_pruned


@pytest.mark.parametrize("backend", ["cpu-bsr", "onednn-dense"])
def test_compiled_patched_model_matches(backend):
    reasons = BACKENDS[backend].not_supported_reasons(torch.device("cpu"), torch.float32, 32)
    if reasons:
        pytest.skip(f"{backend}: {reasons}")
    torch._dynamo.reset()
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37))
    inp = inputs(pad_from=20)
    with torch.inference_mode():
        ref = model(**inp)
    bsbert.patch(model, backend=backend, progress=False)
    compiled = torch.compile(model)
    with torch.inference_mode():
        out = compiled(**inp)
    assert rel_err(ref, out) <= 1e-4
