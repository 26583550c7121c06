"""bsbert.hugepages: packed CPU weights moved into 2 MiB-page memory in place, the same tensor objects
and values; patch records what it placed and why not; the off switch and failures leave 4 KiB pages."""
import gc
import warnings

import pytest
import torch

import bsbert
from bsbert import _ext, hugepages
from tests.helpers import inputs, tiny_pruned

needs_linux_thp = pytest.mark.skipif(hugepages.unavailable_reason() is not None,
                                     reason=f"huge pages unavailable: {hugepages.unavailable_reason()}")
needs_op = pytest.mark.skipif(not _ext.has_op("bsr_linear"),
                              reason=f"bsbert::bsr_linear unavailable: {_ext.reason_unavailable()}")


@needs_linux_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inference", [False, True])
def test_place_moves_the_data_in_place(dtype, inference):
    arena = hugepages.Arena(chunk_bytes=4 << 20)
    with torch.inference_mode(inference):
        t = torch.randn(300, 77).to(dtype)
    ref = t.clone()
    alias = t  # another holder of the same object (a closure, a program's list) sees the move
    assert hugepages.place(t, arena)
    assert alias is t and torch.equal(alias, ref) and t.dtype == dtype and t.shape == ref.shape
    assert t.data_ptr() % hugepages.ALIGN == 0 and arena.owns(t)
    assert not hugepages.place(t, arena)  # already there
    assert t.is_inference() == inference


@needs_linux_thp
def test_what_it_leaves_alone():
    arena = hugepages.Arena(chunk_bytes=4 << 20)
    nc = torch.randn(8, 6).t()
    empty = torch.empty(0)
    grad = torch.randn(4, requires_grad=True)
    for t in (nc, empty, grad):
        ptr = t.data_ptr()
        assert not hugepages.place(t, arena) and t.data_ptr() == ptr


@needs_linux_thp
def test_placed_tensors_outlive_the_arena_and_span_chunks():
    arena = hugepages.Arena(chunk_bytes=2 << 20)
    ts = [torch.randn(n) for n in (300_000, 700_000, 5, 600_000)]  # 1.2, 2.8 (own chunk), ..., 2.4 MB
    refs = [t.clone() for t in ts]
    for t in ts:
        assert hugepages.place(t, arena)
    assert len({t.untyped_storage().data_ptr() for t in ts}) >= 3  # several chunks
    arena.seal()
    t5 = torch.randn(10)
    assert hugepages.place(t5, arena) and t5.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in ts}
    del arena
    gc.collect()
    for t, r in zip(ts, refs):
        assert torch.equal(t, r)
        t.add_(1)  # still writable memory
        assert torch.equal(t, r + 1)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("BSBERT_HUGEPAGES", "0")
    assert hugepages.unavailable_reason() == "BSBERT_HUGEPAGES=0"
    monkeypatch.delenv("BSBERT_HUGEPAGES")
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    if hugepages.sys.platform.startswith("linux"):
        assert "disabled" in hugepages.unavailable_reason()


def _patched(**kw):
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64))
    bsbert.patch(model, progress=False, select="heuristic", backend="cpu-bsr", attention="cpu", **kw)
    return model


def _values(model):
    return [m.choice.prepared.tensors["values"] for m in model.modules()
            if getattr(getattr(m, "choice", None), "backend", None) == "cpu-bsr"]


@needs_op
@needs_linux_thp
def test_patch_places_packed_weights_bit_for_bit(monkeypatch):
    monkeypatch.setattr(hugepages, "_arena", hugepages.Arena())
    placed = _patched()
    plan = placed.bsbert_plan
    vals = _values(placed)
    assert vals and plan.huge_page_bytes == sum(v.numel() * v.element_size() for v in vals)
    assert all(hugepages._arena.owns(v) and v.data_ptr() % hugepages.ALIGN == 0 for v in vals)
    assert "MB in 2 MiB pages" in plan.table()
    monkeypatch.setenv("BSBERT_HUGEPAGES", "0")
    plain = _patched()
    assert plain.bsbert_plan.huge_page_bytes == 0 and plain.bsbert_plan.huge_pages_reason == "BSBERT_HUGEPAGES=0"
    assert "4 KiB pages (BSBERT_HUGEPAGES=0)" in plain.bsbert_plan.table()
    inp = inputs(batch=2, seq=21, pad_from=7)
    with torch.inference_mode():
        assert torch.equal(placed(**inp).start_logits, plain(**inp).start_logits)


@needs_op
@needs_linux_thp
def test_a_failed_mapping_leaves_the_weights_where_they_were(monkeypatch):
    monkeypatch.setattr(hugepages, "_arena", hugepages.Arena())
    monkeypatch.setattr(hugepages, "_madvise", lambda: (lambda addr, n, advice: -1))
    model = _patched()
    assert model.bsbert_plan.huge_page_bytes == 0
    assert "madvise(MADV_HUGEPAGE) failed" in model.bsbert_plan.huge_pages_reason
    with torch.inference_mode():
        model(**inputs(batch=1, seq=9))


@needs_linux_thp
def test_threads_placing_at_once_get_disjoint_memory(monkeypatch):
    """The module-level arena is shared by every patch in a process; without its lock, threads placing at
    once were handed overlapping spans (a tensor then held another thread's values)."""
    import sys
    import threading

    monkeypatch.setattr(hugepages, "_arena", hugepages.Arena())
    placed = []

    def worker(k):
        for i in range(1000):
            t = torch.full((64 + i % 7,), float(k))
            assert hugepages.place(t)  # through the shared arena, as patch does
            placed.append((k, t))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows within a few hundred placements
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert len(placed) == 4000
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for _, t in placed)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), "overlapping placements"
    assert all(hugepages._arena.owns(t) and torch.all(t == k) for k, t in placed)


@pytest.mark.parametrize("value", ["0", "false", "No", " OFF ", "off\n"])
def test_the_usual_spellings_switch_huge_pages_off(monkeypatch, value):
    monkeypatch.setenv("BSBERT_HUGEPAGES", value)
    assert hugepages.unavailable_reason() == f"BSBERT_HUGEPAGES={value.strip()}"


@pytest.mark.parametrize("value", ["1", "true", "Yes", " on "])
def test_the_usual_spellings_leave_huge_pages_on(monkeypatch, recwarn, value):
    monkeypatch.delenv("BSBERT_HUGEPAGES", raising=False)
    default = hugepages.unavailable_reason()
    monkeypatch.setenv("BSBERT_HUGEPAGES", value)
    assert hugepages.unavailable_reason() == default and not recwarn.list


@pytest.mark.parametrize("value", ["", "00", "disable", "0 pages"])
def test_other_values_warn_once_and_keep_the_default(monkeypatch, value):
    """Once any value but exactly "0" left huge pages on without a word ("off", "false", "" and " 0" too)."""
    monkeypatch.setattr(hugepages, "_warned", set())
    monkeypatch.delenv("BSBERT_HUGEPAGES", raising=False)
    default = hugepages.unavailable_reason()
    monkeypatch.setenv("BSBERT_HUGEPAGES", value)
    with pytest.warns(RuntimeWarning, match=r"BSBERT_HUGEPAGES=.* is not one of 0, false, no, off .*ignored"):
        assert hugepages.unavailable_reason() == default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per value, not at every patch
        assert hugepages.unavailable_reason() == default
