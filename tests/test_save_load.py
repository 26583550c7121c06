"""save/load round trip: exact, no dense original, clear errors, never a partial model."""
import json
import math
import os

import pytest
import torch

import bsbert
from tests.helpers import inputs, rel_err, tiny_pruned


def _run(model, inp):
    with torch.inference_mode():
        return model(**inp)


@pytest.mark.parametrize("task", ["qa", "cls"])
def test_round_trip_exact(tmp_path, task):
    model = tiny_pruned(task=task)
    inp = inputs(pad_from=11)
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False)
    out1 = _run(model, inp)
    bsbert.save(model, str(tmp_path))
    meta = json.loads((tmp_path / "bsbert.json").read_text())
    assert meta["format_version"] == 1 and meta["plan"]["layers"][0]["kept_heads"]
    loaded = bsbert.load(str(tmp_path), select="heuristic")
    out2 = _run(loaded, inp)
    assert rel_err(out1, out2) <= 1e-6
    assert rel_err(ref, out2) <= 1e-4
    assert "PrunedSelfAttention" in repr(loaded)
    # no dense original in memory: nothing to unpatch to
    with pytest.raises(bsbert.NotPatchedError, match="dropped.*never loaded.*bsbert.load"):
        bsbert.unpatch(loaded)
    with pytest.raises(bsbert.NotPatchedError, match="verify needs the original modules.*bsbert.load"):
        bsbert.verify(loaded)
    # the file holds packed weights, smaller than the dense ones
    dense_params = sum(p.numel() for n, p in tiny_pruned(task=task).named_parameters() if "encoder" in n)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        packed = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("bsbert.layers"))
    assert packed < dense_params


def test_errors(tmp_path):
    with pytest.raises(bsbert.BsbertError, match="missing"):
        bsbert.load(str(tmp_path / "nope"))
    model = tiny_pruned()
    with pytest.raises(bsbert.NotPatchedError):
        bsbert.save(model, str(tmp_path / "x"))
    bsbert.patch(model, select="heuristic", progress=False)
    good = tmp_path / "good"
    bsbert.save(model, str(good))

    meta = json.loads((good / "bsbert.json").read_text())
    bad = tmp_path / "version"
    os.makedirs(bad)
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (bad / "bsbert.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(bsbert.BsbertError, match="format version 99"):
        bsbert.load(str(bad))

    (bad / "bsbert.json").write_text("{not json")
    with pytest.raises(bsbert.BsbertError, match="corrupt"):
        bsbert.load(str(bad))

    (bad / "bsbert.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(bsbert.BsbertError, match="corrupt"):
        bsbert.load(str(bad))

    shape = tmp_path / "shape"
    os.makedirs(shape)
    (shape / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    meta2 = json.loads(json.dumps(meta))
    meta2["plan"]["layers"][0]["linears"]["qkv"]["packed_shape"] = [999, 128]
    (shape / "bsbert.json").write_text(json.dumps(meta2))
    with pytest.raises(bsbert.BsbertError, match="shape mismatch"):
        bsbert.load(str(shape))
