import json

import pytest
import torch

import bsbert
from bsbert import models
from bsbert.plan import Plan
from tests.helpers import tiny_pruned


def test_structure_detected():
    model = tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0), dead_bias_units=False)
    plan = bsbert.analyze(model)
    assert [len(lp.kept_heads) for lp in plan.layers] == [2, 0, 4]
    assert [len(lp.kept_neurons) for lp in plan.layers] == [100, 37, 0]
    assert plan.layers[0].linears["qkv"].packed_shape == (3 * 2 * 32, 128)
    assert plan.layers[0].linears["ffn_out"].packed_shape == (128, 100)
    s = plan.summary()
    assert s["kept_heads"] == 6 and s["total_heads"] == 12
    assert 1.0 < plan.speedup_bound(384, "packed") <= plan.speedup_bound(384)


def test_plan_round_trip_and_table():
    plan = bsbert.analyze(tiny_pruned())
    d = json.loads(json.dumps(plan.to_dict()))
    again = Plan.from_dict(d)
    assert again.to_dict() == plan.to_dict()
    text = plan.table()
    assert "speedup bound" in text and "heads 6/12" in text


@pytest.mark.slow
def test_seed_like_statistics():
    """The seed-like builder follows the reference checkpoint's published statistics."""
    model = models.seed_like_model(seed=0)
    s = bsbert.analyze(model).summary()
    assert s["kept_heads"] == 229 and s["total_heads"] == 384
    assert abs(s["linear_total"] - 302.0e6) < 0.1e6
    assert abs(s["linear_nonzero"] - 77.8e6) < 0.3e6
    plan = bsbert.analyze(model)
    attn_nz = sum(lp.linears[n].nonzero for lp in plan.layers for n in ("qkv", "attn_out"))
    attn_tot = sum(lp.linears[n].dense_macs() for lp in plan.layers for n in ("qkv", "attn_out"))
    assert abs(attn_nz / attn_tot - 0.380) < 0.005
    ffn = [len(lp.kept_neurons) / lp.ffn_size for lp in plan.layers]
    assert abs(sum(ffn) / len(ffn) - 0.197) < 0.002 and min(ffn) >= 0.018 - 1e-3 and max(ffn) <= 0.294 + 1e-3
    assert all(70 <= len(lp.kept_neurons) <= 140 for lp in plan.layers[21:])
    assert 3.4 < plan.speedup_bound(384) < 3.8


def test_seed_like_is_deterministic():
    a = models.seed_like_model(seed=5, num_hidden_layers=2)
    b = models.seed_like_model(seed=5, num_hidden_layers=2)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_nothing_left_to_compute_has_no_speedup_bound():
    # every head and neuron pruned: the bound was dense FLOPs over max(1, 0) FLOPs, printed as 201326592x
    plan = bsbert.analyze(tiny_pruned(heads=(0, 0), ffn=(0, 0)))
    assert plan.flops(384) == 0 and plan.speedup_bound(384) is None
    assert "no speedup bound (no encoder linear or attention FLOPs left)" in str(plan)
    assert json.loads(json.dumps(plan.to_dict(), allow_nan=False))["summary"]["bound_seq384"] is None
    assert bsbert.analyze(tiny_pruned()).speedup_bound(384) > 1


def test_layers_without_kept_heads_show_no_attention_backend():
    # such a layer showed "cpu" (reason "first eligible ...") in the plan table though no attention runs
    model = tiny_pruned(heads=(2, 0), ffn=(100, 37), hidden=64).eval()
    bsbert.patch(model, select="heuristic", progress=False)
    lp = model.bsbert_plan.layers[1]
    assert not lp.kept_heads and lp.attention_reason == "no kept heads: no attention runs"
    row = [line for line in model.bsbert_plan.table(seq=16).splitlines() if line.lstrip().startswith("1 ")]
    assert row and lp.attention_backend not in row[0].split(), row


def test_small_models_print_their_flops():
    # every count printed as "0.0 G" and "0.0M of 0.1M" for a tiny model
    model = tiny_pruned(heads=(2, 0), ffn=(100, 37), hidden=64).eval()
    text = bsbert.analyze(model).table(seq=16)
    assert "dense 0.0 G" not in text and "non-zero 0.0M" not in text, text


def test_remaining_flops_count_edge_tiles_at_their_size():
    # bsr_macs was block_density x packed size: a partial edge tile counted as a whole 32 x 32 one
    from bsbert.analyze import nonempty_area
    from bsbert.plan import LinearPlan

    w = torch.zeros(100, 64)
    w[96:100, 32:64] = 1.0   # the partial last tile row (4 x 32)
    w[0:32, 0:32] = 1.0      # a whole tile
    assert nonempty_area(w) == 4 * 32 + 32 * 32
    w[96:100, 32:64] = 0.0
    w[40:50, 40:50] = 1.0    # a whole tile in place of the partial one
    assert nonempty_area(w) == 2 * 32 * 32
    assert nonempty_area(torch.zeros(0, 64)) == 0 and nonempty_area(torch.ones(33, 1)) == 33
    lp = LinearPlan("qkv", (100, 64), (100, 64), int(w.ne(0).sum()), 0.25, nonempty_area=nonempty_area(w))
    assert lp.bsr_macs() == 2048
    old = Plan.from_dict(json.loads(json.dumps(tiny_plan_dict := bsbert.analyze(tiny_pruned()).to_dict())))
    assert all(lin.nonempty_area is not None for lay in old.layers for lin in lay.linears.values())
    for lay in tiny_plan_dict["layers"]:  # a plan saved before the field: the density product as before
        for lin in lay["linears"].values():
            del lin["nonempty_area"]
    legacy = Plan.from_dict(tiny_plan_dict)
    lin = legacy.layers[0].linears["qkv"]
    assert lin.nonempty_area is None and lin.bsr_macs() == round(lin.block_density * lin.packed_macs())
