"""Bad input to the CPU ops called directly (torch.ops.bsbert.*): a clear error naming the problem, or
the right answer, never a crash or a silent wrong answer. One test per finding of an adversarial audit
of the ops' checks (the errors they already gave are covered by the ops' own test files)."""
from __future__ import annotations

import math

import pytest
import torch

from bsbert import _ext
from tests.helpers import cpu_isa_levels


def _has_cpu(op: str) -> bool:
    return _ext.available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbert::{op}", "CPU")


needs = {op: pytest.mark.skipif(not _has_cpu(op), reason=f"CPU bsbert::{op} unavailable")
         for op in ("bsr_linear", "pruned_attention", "pruned_attention_varlen", "bert_encoder",
                    "bert_encoder_registered", "bert_embeddings")}
ops = torch.ops.bsbert if _ext.available() else None

HIDDEN, HEADS, HEAD_DIM, FFN = 64, 2, 16, 128
T_PER_LAYER, I_PER_LAYER = 20, 18  # bert_encoder's tensors and ints per layer (csrc/ops.cpp)


def _bsr(n, k, block, dtype, gen):
    from bsbert.formats import BlockSparseMatrix
    from bsbert.ops.packing import pack_cpu

    bsm = BlockSparseMatrix.from_dense(torch.randn(n, k, generator=gen), block)
    return [bsm.crow_indices.clone(), bsm.col_indices.clone(), pack_cpu(bsm, dtype),
            torch.randn(n, generator=gen).to(dtype)]


def _encoder_lists(layers=3, dtype=torch.float32, block=32, seed=0):
    """bert_encoder's lists for `layers` block-sparse layers (hidden 64, 2 heads of 16, FFN 128)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, ints, floats = [], [], []
    ctx = HEADS * HEAD_DIM
    for _ in range(layers):
        ints += [HEADS, HEAD_DIM]
        for n, k in ((3 * ctx, HIDDEN), (HIDDEN, ctx), (FFN, HIDDEN), (HIDDEN, FFN)):
            tensors += _bsr(n, k, block, dtype, gen)
            ints += [0, n, k, block]
        tensors += [(1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype), torch.zeros(HIDDEN, dtype=dtype),
                    (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype), torch.zeros(HIDDEN, dtype=dtype)]
        floats += [1 / math.sqrt(HEAD_DIM), 1e-12, 1e-12]
    return tensors, ints, floats


# ---- pruned_attention / pruned_attention_varlen ------------------------------------------------------

@needs["pruned_attention"]
def test_attention_num_heads_that_wrap_3_h_d_are_refused():
    # 3 * (2^60 + 1) * 16 wraps around to 48: the check passed and the kernel ran 2^60 + 1 heads over a
    # 16-wide output (out-of-bounds writes; B = 16 returned a "result")
    with pytest.raises(RuntimeError, match=r"qkv last dimension must be 3 \* num_heads \* head_dim"):
        ops.pruned_attention(torch.randn(16, 2, 48), None, 2 ** 60 + 1, 16, 0.25)


@needs["pruned_attention_varlen"]
def test_varlen_num_heads_that_wrap_3_h_d_are_refused():
    cu = torch.arange(0, 33, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"qkv last dimension must be 3 \* num_heads \* head_dim"):
        ops.pruned_attention_varlen(torch.randn(32, 48), cu, 2, 2 ** 60 + 1, 16, 0.25)


def _attention_ref(qkv, heads, head_dim, scale):
    b, s, _ = qkv.shape
    q, k, v = qkv.double().view(b, s, 3, heads, head_dim).unbind(2)
    p = (torch.einsum("bihd,bjhd->bhij", q, k) * scale).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, s, heads * head_dim)


@needs["pruned_attention"]
@pytest.mark.parametrize("isa", cpu_isa_levels(bf16_level=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("part,value", [("q", math.nan), ("k", math.nan), ("k", math.inf), ("q", -math.inf)])
def test_attention_nan_and_inf_scores_propagate_as_in_torch(monkeypatch, isa, dtype, part, value):
    # A NaN or infinite score was clamped to a weight of 0 (exp2 of max(NaN, -127)): a query with a NaN
    # came out as zeros and a NaN key was ignored, where torch's softmax gives NaN
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 40, 2, 32
    qkv = torch.randn(b, s, 3 * h * d, generator=gen)
    qkv[0, 3, {"q": 0, "k": h * d}[part] + 1] = value
    qkv = qkv.to(dtype)
    out = ops.pruned_attention(qkv, None, h, d, 0.25)
    ref = _attention_ref(qkv, h, d, 0.25)
    assert ref.isnan().any()
    assert torch.equal(out.isnan().any(-1), ref.isnan().any(-1))
    assert torch.isfinite(out[1]).all()  # the other sequence is untouched


# ---- bert_encoder / bert_encoder_registered --------------------------------------------------------------

@needs["bert_encoder"]
def test_encoder_integer_mask_of_another_shape_is_refused_even_without_a_zero():
    # an integer mask without a zero is dropped (it masks nothing), so its shape was never looked at
    t, i, f = _encoder_lists(1)
    hidden = torch.randn(2, 10, HIDDEN)
    for mask in (torch.ones(3, 7, dtype=torch.long), torch.ones(20, dtype=torch.long),
                 torch.ones(2, 1, 1, 10, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \[2, 10\]"):
            ops.bert_encoder(hidden, mask, t, i, f)


def _dense_qkv(t, i, weight, bias="keep", kind=1):
    t, i = list(t), list(i)
    t[0:3] = [weight, None, None]
    if bias != "keep":
        t[3] = bias
    i[2] = kind
    return t, i


@needs["bert_encoder"]
@pytest.mark.parametrize("kind", [1, 2])
def test_encoder_dense_linear_errors_name_layer_and_argument(kind):
    # oneDNN's error was "could not create a primitive descriptor for the inner product forward
    # propagation primitive"; torch's named neither the layer nor the argument
    if kind == 1 and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("no oneDNN linear in this torch")
    t, i, f = _encoder_lists(1)
    hidden = torch.randn(2, 10, HIDDEN)
    n = 3 * HEADS * HEAD_DIM
    cases = [(torch.randn(n, HIDDEN - 1), "keep", r"layer 0 qkv: dense weight must be \[out_features, 64\]"),
             (torch.randn(n), "keep", r"layer 0 qkv: dense weight must be \[out_features, 64\]"),
             (torch.randn(n, HIDDEN).double(), "keep", r"layer 0 qkv: dense weight dtype \(Double\)"),
             (torch.randn(n, HIDDEN).bfloat16(), "keep", r"layer 0 qkv: dense weight dtype \(BFloat16\)"),
             (torch.randn(n, HIDDEN), torch.randn(5), r"layer 0 qkv: bias must be a CPU tensor of shape \[96\]"),
             (torch.randn(n, HIDDEN), torch.randn(n).double(), r"layer 0 qkv: bias dtype \(Double\)")]
    for weight, bias, match in cases:
        tt, ii = _dense_qkv(t, i, weight, bias, kind)
        with pytest.raises(RuntimeError, match=match):
            ops.bert_encoder(hidden, None, tt, ii, f)
    tt, ii = _dense_qkv(t, i, torch.randn(n, HIDDEN), "keep", kind)
    assert ops.bert_encoder(hidden, None, tt, ii, f).shape == hidden.shape  # a right one still runs


@needs["bert_encoder"]
def test_encoder_huge_out_features_get_the_linear_error_not_an_overflow():
    # out_features near 2^60 in a later layer's ints: the intermediates' byte counts wrapped around (slots
    # overlapped) and the error was "numel: integer multiplication overflow"
    t, i, f = _encoder_lists(2)
    for pos, value in ((I_PER_LAYER + 2 + 1, 2 ** 60), (I_PER_LAYER + 2 + 2 * 4 + 1, 2 ** 61)):  # layer 1: qkv n, FFN in n
        ii = list(i)
        ii[pos] = value
        with pytest.raises(RuntimeError, match=r"bsr_linear: crow_indices must have ceil\(out_features/block\)\+1"):
            ops.bert_encoder(torch.randn(4, 128, HIDDEN), None, t, ii, f)


class _Registered:
    """A 3-layer encoder registered with the extension, run until layer 1's row chain is kept."""

    def __init__(self):
        self.mod = _ext.load(warn=False)
        self.t, self.i, self.f = _encoder_lists(3)
        self.hidden = torch.randn(4, 128, HIDDEN, generator=torch.Generator().manual_seed(3))
        self.handle = self.mod.encoder_register(self.t, self.i, self.f)
        self.before = self.run()
        assert torch.equal(self.run(), self.before)
        assert self.mod.encoder_cached_chains(self.handle) == 1  # the audited path: a kept chain
        assert self.reuses() == 1  # ... run again on the second call (not prepared again)

    def run(self):
        with torch.inference_mode():
            return ops.bert_encoder_registered(self.hidden, None, self.handle)

    def reuses(self):
        return self.mod.encoder_chain_reuses(self.handle)

    def listed(self):
        with torch.inference_mode():
            return ops.bert_encoder(self.hidden, None, self.t, self.i, self.f)

    def close(self):
        self.mod.encoder_release(self.handle)


@pytest.fixture
def registered():
    if not _has_cpu("bert_encoder_registered"):
        pytest.skip("CPU bsbert::bert_encoder_registered unavailable")
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # (M = 512 rows: row tiles, so chains, on 1 or 2 threads)
    reg = _Registered()
    try:
        yield reg
    finally:
        reg.close()
        torch.set_num_threads(old)


# layer 1's attention-output linear (kept in layer 1's chain): crow, col, packed at these positions
L1_OUT = T_PER_LAYER + 4
L1_LN_ATTN_W = T_PER_LAYER + 16


def test_registered_index_edited_in_place_is_checked_again(registered):
    # a kept chain checked its index values once: col_indices written in place were read unchecked
    # (segfault)
    registered.t[L1_OUT + 1].fill_(1000)
    with pytest.raises(RuntimeError, match=r"col_indices\[0\] = 1000 is outside"):
        registered.run()


def test_registered_index_swapped_through_data_is_checked_again(registered):
    # .data = another tensor: the kept chain read the old, freed crow_indices (segfault)
    registered.t[L1_OUT].data = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"crow_indices must have ceil\(out_features/block\)\+1 = 3 entries, got 2"):
        registered.run()


def test_registered_packed_values_set_to_other_memory_are_checked_again(registered):
    # set_ (what bsbert.hugepages.place does) to a smaller tensor: the kept chain read freed memory
    registered.t[L1_OUT + 2].set_(torch.zeros(1))
    with pytest.raises(RuntimeError, match="packed_values must hold nnz_blocks\\*block\\*block = 2048 values, got 1"):
        registered.run()


def test_registered_packed_values_replaced_through_data_are_used(registered):
    # .data = new values: the kept chain computed with the old (freed) ones, a silent wrong answer
    p = registered.t[L1_OUT + 2]
    p.data = p.data * 2
    out = registered.run()
    assert torch.equal(out, registered.listed()) and not torch.equal(out, registered.before)


def test_registered_layer_norm_weight_replaced_through_data_is_used(registered):
    # (came out NaN: the kept chain read the freed weight)
    w = registered.t[L1_LN_ATTN_W]
    w.data = torch.full_like(w, 2.0)
    out = registered.run()
    assert torch.equal(out, registered.listed()) and not torch.equal(out, registered.before)


def test_registered_layer_norm_weight_resized_is_checked_again(registered):
    # resize_ keeps the memory: the kept chain read N values of a 1-element weight
    registered.t[L1_LN_ATTN_W].resize_(1)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[64\] \((the last dim of x|out_features)\), got \[1\]"):
        registered.run()


def test_registered_chain_is_kept_again_after_a_change(registered):
    # after a change the chain is prepared again and kept: the same values as the list op afterwards too
    p = registered.t[L1_OUT + 2]
    with torch.no_grad():
        p.mul_(0.5)
    assert torch.equal(registered.run(), registered.listed())
    assert registered.mod.encoder_cached_chains(registered.handle) == 1
    assert registered.reuses() == 1  # the changed chain was prepared again, not run as kept
    assert torch.equal(registered.run(), registered.listed())
    assert registered.reuses() == 2  # and kept again


def test_registered_chain_is_reused_while_nothing_changed(registered):
    # the stamps must not make every call prepare its chains again (the cache would silently stop paying):
    # an unchanged encoder reuses its kept chain on every call, also after other tensors were read
    for n in range(2, 5):
        assert torch.equal(registered.run(), registered.before)
        assert registered.reuses() == n


# ---- bert_embeddings -----------------------------------------------------------------------------------

@needs["bert_embeddings"]
@pytest.mark.parametrize("fp32_arg", ["ln_weight", "ln_bias"])
def test_embeddings_layer_norm_pair_of_two_dtypes(fp32_arg):
    # each of ln_weight / ln_bias may be the tables' dtype or float32, but at::layer_norm wants one dtype
    # for both: a mixed pair failed inside torch ("mixed dtype (CPU): expect parameter to have scalar
    # type of Float" / "expected scalar type BFloat16 but found Float"). Now widened to fp32, as
    # add_layer_norm does.
    gen = torch.Generator().manual_seed(0)
    h = 32
    word, pos, typ = (torch.randn(r, h, generator=gen).bfloat16() for r in (50, 16, 2))
    ids = torch.randint(0, 50, (2, 10), generator=gen)
    w, b = 1 + 0.1 * torch.randn(h, generator=gen), 0.1 * torch.randn(h, generator=gen)
    args = {"ln_weight": w.bfloat16(), "ln_bias": b.bfloat16()}
    args[fp32_arg] = args[fp32_arg].float()
    out = ops.bert_embeddings(ids, None, word, pos, typ, args["ln_weight"], args["ln_bias"], 1e-12)
    widened = ops.bert_embeddings(ids, None, word, pos, typ, args["ln_weight"].float(), args["ln_bias"].float(),
                                  1e-12)
    assert out.dtype == torch.bfloat16 and torch.equal(out, widened)
    empty = ops.bert_embeddings(ids[:0], None, word, pos, typ, args["ln_weight"], args["ln_bias"], 1e-12)
    assert empty.shape == (0, 10, h)


# ---- bsr_linear ----------------------------------------------------------------------------------------

@needs["bsr_linear"]
def test_bsr_linear_out_features_near_int64_max_named_without_overflow():
    # ceil(N / block) was computed as (N + block - 1) / block: for N = 2^63 - 1 the error named a
    # negative entry count
    crow = torch.zeros(3, dtype=torch.int32)
    col = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"ceil\(out_features/block\)\+1 = 288230376151711745 entries, got 3"):
        ops.bsr_linear(torch.randn(2, 32), crow, col, torch.zeros(0), None, 2 ** 63 - 1, 32, 32, False)


# ---- one meta tensor among CPU ones --------------------------------------------------------------------
# A single meta argument sends the whole call to the Meta (fake) kernel, which returned an uninitialised
# CPU tensor as the "result". The fake kernels now refuse tensors on two devices (bsbert/ops/fake.py).

def _meta_mix_cases():
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 5, 3 * HEADS * HEAD_DIM, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    tensors, ints, floats = _encoder_lists(layers=1)
    meta_tensors = list(tensors)
    meta_tensors[4] = meta_tensors[4].to("meta")
    ids = torch.randint(0, 10, (2, 5), generator=gen)
    emb = [torch.randn(10, HIDDEN), torch.randn(8, HIDDEN), torch.randn(2, HIDDEN), torch.ones(HIDDEN),
           torch.zeros(HIDDEN)]
    return {
        "pruned_attention/key_padding_mask": (
            "pruned_attention", lambda: ops.pruned_attention(qkv, mask.to("meta"), HEADS, HEAD_DIM, 0.25),
            "key_padding_mask is on meta"),
        "pruned_attention_varlen/cu_seqlens": (
            "pruned_attention_varlen",
            lambda: ops.pruned_attention_varlen(qkv[0], torch.tensor([0, 5], dtype=torch.int32, device="meta"), 5,
                                                HEADS, HEAD_DIM, 0.25),
            "cu_seqlens is on meta"),
        "bert_encoder/tensors[4]": (
            "bert_encoder",
            lambda: ops.bert_encoder(torch.randn(2, 5, HIDDEN), None, meta_tensors, ints, floats),
            r"tensors\[4\] is on meta"),
        "bert_embeddings/position": (
            "bert_embeddings",
            lambda: ops.bert_embeddings(ids, None, emb[0], emb[1].to("meta"), emb[2], emb[3], emb[4], 1e-12),
            "position is on meta"),
    }


@pytest.mark.parametrize("case", list(_meta_mix_cases()) if _ext.available() else [])
def test_one_meta_tensor_among_cpu_ones_is_refused(case):
    op, call, match = _meta_mix_cases()[case]
    if not _has_cpu(op):
        pytest.skip(f"CPU bsbert::{op} unavailable")
    with pytest.raises(RuntimeError, match=match):
        call()


@needs["pruned_attention"]
def test_all_meta_arguments_still_give_a_meta_result():
    qkv = torch.empty(2, 5, 3 * HEADS * HEAD_DIM, device="meta")
    out = ops.pruned_attention(qkv, torch.empty(2, 5, dtype=torch.bool, device="meta"), HEADS, HEAD_DIM, 0.25)
    assert out.device.type == "meta" and out.shape == (2, 5, HEADS * HEAD_DIM)


_ATTN_AFTER_BAD_ALLOC = r"""
import os, resource, sys, torch
import bsbert
torch.set_num_threads(1)
qkv = torch.randn(2, 40, 3 * 2 * 64)
mask = torch.ones(2, 40, dtype=torch.bool)
mask[-1, 25:] = False
call = lambda: torch.ops.bsbert.pruned_attention(qkv, mask, 2, 64, 0.125)
ref = call()
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
os.environ["BSBERT_ATTN_MQ"], os.environ["BSBERT_ATTN_KC"] = "4096", "65536"  # ~1 GiB of scratch
try:
    call()
    print("no error")
except (MemoryError, RuntimeError) as e:
    print("refused:", type(e).__name__)
del os.environ["BSBERT_ATTN_MQ"], os.environ["BSBERT_ATTN_KC"]
print("equal after:", torch.equal(call(), ref))
"""


@needs["pruned_attention"]
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_attention_after_a_failed_scratch_allocation_still_runs():
    # thread_buffer freed the old buffer and then threw std::bad_alloc, keeping its old capacity: the next
    # call of a smaller size got a null buffer and the process died (SIGSEGV)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ATTN_AFTER_BAD_ALLOC], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "refused: MemoryError" in r.stdout and "equal after: True" in r.stdout, r.stdout


@needs["pruned_attention"]
@pytest.mark.parametrize("name,value", [("BSBERT_ATTN_KC", "4611686018427387904"),
                                        ("BSBERT_ATTN_MQ", "4611686018427387904"),
                                        ("BSBERT_ATTN_PREFETCH", "9223372036854775807")])
def test_attention_tuning_switches_out_of_range_fall_back(monkeypatch, name, value):
    # 2^62 keys wrapped the scratch size to a small buffer: NaN outputs without an error, or a crash
    qkv = torch.randn(2, 40, 3 * 2 * 64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[-1, 25:] = False
    ref = ops.pruned_attention(qkv, mask, 2, 64, 0.125)
    monkeypatch.setenv(name, value)
    assert torch.equal(ops.pruned_attention(qkv, mask, 2, 64, 0.125), ref)


@needs["bsr_linear"]
@pytest.mark.parametrize("name,value", [("BSBERT_BSR_KC", "99999999999"), ("BSBERT_BSR_MC", "9223372036854775807")])
def test_bsr_tuning_switches_out_of_range_fall_back(monkeypatch, name, value):
    # atoi of a KC past int was undefined; an MC near int64 max overflowed the tile count
    crow, col, packed, bias = _bsr(96, 64, 32, torch.float32, torch.Generator().manual_seed(5))
    x = torch.randn(37, 64)
    ref = ops.bsr_linear(x, crow, col, packed, bias, 96, 64, 32, False)
    monkeypatch.setenv(name, value)
    torch.testing.assert_close(ops.bsr_linear(x, crow, col, packed, bias, 96, 64, 32, False), ref)
