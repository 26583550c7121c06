"""patch(fused_encoder=...): the whole encoder as one op (bsbert::bert_encoder) computes bit for bit what
the per-layer path computes, steps aside for calls it does not cover (hooks, collected hidden states,
torch.compile, other dtypes), and comes off with verify's swap and unpatch."""
import copy

import pytest
import torch

import bsbert
from bsbert import _ext, fused_encoder
from tests.helpers import inputs, skip_unless_backend_fits, tiny_pruned
from tests.helpers import qa_outputs_itself  # noqa: F401  (the fixture pytestmark names)

# these tests compare forward paths bit for bit: the QA head runs qa_outputs itself (see helpers)
pytestmark = pytest.mark.usefixtures("qa_outputs_itself")

needs_op = pytest.mark.skipif(not _ext.has_op("bert_encoder"),
                              reason=f"bsbert::bert_encoder unavailable: {_ext.reason_unavailable()}")

HEADS, FFN = (2, 3, 4), (100, 37, 64)  # every layer keeps heads and neurons


def _patched(dtype=torch.float32, **kw):
    if kw.get("backend"):
        skip_unless_backend_fits(kw["backend"], dtype)
    model = tiny_pruned(heads=HEADS, ffn=FFN).to(dtype)
    kw.setdefault("select", "heuristic")
    bsbert.patch(model, progress=False, attention="cpu", **kw)
    return model


def _run(model, inp, **kw):
    with torch.inference_mode():
        return model(**inp, **kw)


def _both(model, inp, **kw):
    """(fused, per-layer) outputs of the same patched model."""
    enc = model.bert.encoder
    assert fused_encoder.installed(enc)
    fused = _run(model, inp, **kw)
    fused_encoder.detach(enc)
    try:
        per_layer = _run(model, inp, **kw)
    finally:
        fused_encoder.attach(enc)
    return fused, per_layer


def _called(monkeypatch):
    """Counts calls of the op, in either form (wrapping the namespace attributes the fused forward looks up)."""
    calls = []
    for name in ("bert_encoder", "bert_encoder_registered"):
        op = getattr(torch.ops.bsbert, name)

        def counting(*args, op=op):
            calls.append(1)
            return op(*args)
        monkeypatch.setattr(torch.ops.bsbert, name, counting)
    return calls


@needs_op
@pytest.mark.parametrize("backend", ["cpu-bsr", "onednn-dense", "torch-dense", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad_from", [None, 9])
def test_bit_for_bit_the_per_layer_path(monkeypatch, backend, dtype, pad_from):
    model = _patched(dtype, backend=backend)
    assert model.bsbert_plan.fused_encoder, model.bsbert_plan.fused_encoder_reason
    inp = inputs(batch=2, seq=23, pad_from=pad_from)
    calls = _called(monkeypatch)
    fused, per_layer = _both(model, inp)
    assert calls == [1]  # the fused run went through the op, the per-layer run did not
    assert torch.equal(fused.start_logits, per_layer.start_logits)
    assert torch.equal(fused.end_logits, per_layer.end_logits)


@needs_op
@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 1), (1, 2)])
def test_one_token_rows(batch, seq):
    # M = 1..3 rows: the GEMMs take their block-row split, the attention a single key
    model = _patched()
    fused, per_layer = _both(model, inputs(batch=batch, seq=seq))
    assert torch.equal(fused.start_logits, per_layer.start_logits)


@needs_op
def test_mixed_backends_and_masked_dense_reference():
    inp = inputs(batch=2, seq=19, pad_from=4)
    model = tiny_pruned(heads=HEADS, ffn=FFN)
    ref = _run(model, inp)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    # layer 1's FFN on oneDNN, layer 2's attention output on torch's linear, the rest as chosen:
    # every kind in one program
    from bsbert.ops.linear_backends import OneDnnDense, TorchDense

    layers = model.bert.encoder.layer
    for lin, backend, gelu in ((layers[1].intermediate.dense, OneDnnDense(), True),
                               (layers[2].attention.output.dense, TorchDense(), False)):
        lin.choice.prepared = backend.prepare(lin.packed_weight(), lin.bias, gelu, None)
        lin.choice.backend = backend.name
    fused_encoder.uninstall(model.bert.encoder)
    assert fused_encoder.install(model.bert.encoder, model.bert.encoder.layer, 128, torch.float32) is None
    ints = model.bert.encoder._bsbert_program.ints
    kinds = [ints[layer * fused_encoder.INTS_PER_LAYER + 2 + 4 * j] for layer in range(len(HEADS)) for j in range(4)]
    assert kinds[1 * 4 + 2] == 1 and kinds[2 * 4 + 1] == 2 and 0 in kinds
    fused, per_layer = _both(model, inp)
    assert torch.equal(fused.start_logits, per_layer.start_logits)
    scale = ref.start_logits.abs().max()
    assert ((fused.start_logits - ref.start_logits).abs().max() / scale).item() < 1e-4


def _chains_and_output(model, inp):
    """(how many row chains the encoder op ran, start logits); the chains from their profiler ranges."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = _run(model, inp)
    return sum(e.name == "bsbert::bsr_row_chain" for e in prof.events()), out.start_logits


# Row chains need 2 register tiles of rows per thread (BsrRowChain::applies), so the edge cases below follow
# the tile of the path this CPU takes (AVX2 6 rows fp32, AVX-512 12; the extension says which).
_MAX_ROW_TILE = 12  # the largest register tile at any ISA level (AVX-512 fp32, AVX512-BF16 bf16)


def _row_tile(dtype) -> int:
    rows = _ext.load(warn=False).cpu_bsr_register_rows(dtype == torch.bfloat16)  # (BSBERT_CPU_ISA applied)
    assert 1 <= rows <= _MAX_ROW_TILE
    return rows


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads,batch,seq,pad_from,chains", [
    (1, 1, "2 tiles", None, 3),  # the smallest M that takes row tiles on one thread (2 register tiles)
    (2, 2, 25, 7, 3),            # odd rows per thread, padding
    (2, 1, "4 tiles - 1", None, 0),  # one row short of row tiles on two threads: every linear its own call
    (3, 3, 70, 11, 3),           # 210 rows: 3 tiles of 70, three threads
    (2, 2, 400, None, 3),        # 800 rows: 4 tiles of 200 (two per thread, each at most 192 rows + 8)
])
def test_row_chain_bit_for_bit(monkeypatch, dtype, threads, batch, seq, pad_from, chains):
    # attention output, FFN in, FFN out and the next layer's QKV of each thread's rows in one region
    # (bsbert::cpu::BsrRowChain), with the intermediates in per-thread buffers: the same bits as one op
    # call per linear (BSBERT_ENCODER_CHAIN=0) and as the per-layer path, over two calls (buffers reused)
    model = _patched(dtype, backend="cpu-bsr")
    if isinstance(seq, str):  # an edge that follows this CPU's register tile (AVX2: 6 rows, AVX-512: 12)
        seq = {"2 tiles": 2 * _row_tile(dtype), "4 tiles - 1": 4 * _row_tile(dtype) - 1}[seq]
    else:  # the fixed cases take row tiles at every ISA level (up to 12-row tiles)
        assert batch * seq >= 2 * threads * _MAX_ROW_TILE
    inp = inputs(batch=batch, seq=seq, pad_from=pad_from)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, chained = _chains_and_output(model, inp)
        n2, again = _chains_and_output(model, inp)
        monkeypatch.setenv("BSBERT_ENCODER_CHAIN", "0")
        n_off, unchained = _chains_and_output(model, inp)
        monkeypatch.delenv("BSBERT_ENCODER_CHAIN")
        _, per_layer = _both(model, inp)
    finally:
        torch.set_num_threads(old)
    assert (n, n2, n_off) == (chains, chains, 0)
    assert torch.equal(chained, unchained) and torch.equal(again, chained)
    assert torch.equal(chained, per_layer.start_logits)


@needs_op
def test_row_chain_skips_layers_with_other_linears():
    # layer 1's FFN in on oneDNN: layer 1 runs one call per linear (layer 0's chain still computes its
    # QKV), layers 0 and 2 chain; the same bits as the per-layer path
    model = _patched(backend="cpu-bsr")
    from bsbert.ops.linear_backends import OneDnnDense

    lin = model.bert.encoder.layer[1].intermediate.dense
    lin.choice.prepared = OneDnnDense().prepare(lin.packed_weight(), lin.bias, True, None)
    lin.choice.backend = OneDnnDense.name
    fused_encoder.uninstall(model.bert.encoder)
    assert fused_encoder.install(model.bert.encoder, model.bert.encoder.layer, 128, torch.float32) is None
    inp = inputs(batch=2, seq=30)
    n, chained = _chains_and_output(model, inp)
    _, per_layer = _both(model, inp)
    assert n == 2 and fused_encoder.chained_layers(model.bert.encoder._bsbert_program) == 2
    assert "2 with a row chain" in repr(model.bert.encoder)
    assert torch.equal(chained, per_layer.start_logits)


@needs_op
def test_a_replaced_choice_or_module_is_never_computed_with_the_old_tensors(monkeypatch):
    from bsbert.ops.linear_backends import OneDnnDense

    model = _patched()
    inp = inputs(batch=1, seq=11)
    calls = _called(monkeypatch)
    lin = model.bert.encoder.layer[0].attention.self.qkv
    w = lin.packed_weight()
    lin.choice.prepared = OneDnnDense().prepare(w * 2, lin.bias, False, None)  # a different weight
    out = _run(model, inp)
    assert calls == []  # the op's tensors are stale: the per-layer path ran, with the new weight
    assert "do not match backend cpu-bsr" in fused_encoder.program(model.bert.encoder.layer, torch.float32)
    lin.choice.backend = "onednn-dense"
    assert calls == []  # the op's tensors are stale: the per-layer path ran, with the new weight
    fused_encoder.detach(model.bert.encoder)
    assert torch.equal(out.start_logits, _run(model, inp).start_logits)
    fused_encoder.uninstall(model.bert.encoder)
    assert fused_encoder.install(model.bert.encoder, model.bert.encoder.layer, 128, torch.float32) is None
    _run(model, inp)
    assert calls == [1]


@needs_op
def test_staleness_check_is_cheap_when_nothing_changed_and_still_sees_replacements(monkeypatch):
    """bsbert's own modules and choices bump bsbert.generation's counter when an attribute is set, and any
    module's submodule assignment does through torch's module-registration hook: a forward changes none
    (so the check stays one comparison), patching another model moves the counter without making this
    encoder stale, and a replaced submodule of a bsbert module (setattr or add_module) or of one of
    transformers' layer modules is seen."""
    from bsbert import generation
    from bsbert.nn import SparseLinear

    model = _patched()
    inp = inputs(batch=1, seq=9)
    calls = _called(monkeypatch)
    _run(model, inp)
    prog = model.bert.encoder._bsbert_program
    before = generation.current()
    assert prog.generation == before and prog.watch_bsbert
    assert not prog.watch  # transformers' submodules too are counted (this torch has the hook)
    _run(model, inp)
    _run(model, inp)
    assert generation.current() == before and calls == [1, 1, 1]
    _patched()  # another model: the counter moves (its own patch may call the op too)
    assert generation.current() != before
    n = len(calls)
    _run(model, inp)
    assert len(calls) == n + 1 and prog.generation == generation.current()  # this encoder is still current
    so = model.bert.encoder.layer[2].attention.output
    old = so.dense
    so.dense = SparseLinear(old.in_features, old.out_features, old.bias, old.choice, old.gelu, old.density)
    out = _run(model, inp)
    assert len(calls) == n + 1  # a new module object: the per-layer path ran
    fresh = SparseLinear(old.in_features, old.out_features, old.bias, old.choice, old.gelu, old.density)
    so.dense = old  # back: current again
    assert torch.equal(_run(model, inp).start_logits, out.start_logits) and len(calls) == n + 2
    so.add_module("dense", fresh)  # add_module (no __setattr__) bumps the counter too
    _run(model, inp)
    assert len(calls) == n + 2
    so.add_module("dense", old)
    _run(model, inp)
    assert len(calls) == n + 3
    layer = model.bert.encoder.layer[1]  # transformers' BertLayer: its submodule replaced by a copy
    layer.intermediate = copy.deepcopy(layer.intermediate)
    _run(model, inp)
    assert len(calls) == n + 3


@needs_op
def test_steps_aside_for_hooks_and_collected_outputs(monkeypatch):
    model = _patched()
    inp = inputs(batch=1, seq=15)
    calls = _called(monkeypatch)
    out = _run(model, inp, output_hidden_states=True)
    assert calls == [] and len(out.hidden_states) == len(HEADS) + 1
    base = _run(model, inp)
    assert calls == [1]  # transformers' capture hooks stay installed but are inactive: fused again
    seen = []
    h = model.bert.encoder.layer[1].intermediate.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    try:
        hooked = _run(model, inp)
    finally:
        h.remove()
    assert seen and calls == [1]
    assert torch.equal(hooked.start_logits, base.start_logits)
    p = model.bert.encoder.layer[2].attention.self.qkv.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    try:
        _run(model, inp)
    finally:
        p.remove()
    assert seen[-1] == "pre" and calls == [1]
    _run(model, inp)
    assert calls == [1, 1]  # hooks removed: fused again
    with torch.inference_mode():  # another dtype than the model's: the per-layer path says what is wrong
        emb = model.bert.embeddings(inp["input_ids"])
        assert fused_encoder.why_not_now(model.bert.encoder._bsbert_program, emb.double(), None, (), {})


def test_capture_check_under_compile_does_not_read_the_context_variable(monkeypatch):
    """Before torch 2.14 dynamo cannot trace ContextVar.get: reading transformers' capture variable while
    compiling broke the graph of every compiled patched forward (seen with torch 2.13). While compiling,
    only the plain attribute transformers itself uses under compile is read."""
    fused_encoder._capturing()  # looks the variable up
    collector = fused_encoder._COLLECTOR[0]
    if collector is None:
        pytest.skip("this transformers has no output-capturing variable")

    class Untraceable:  # stands in for the ContextVar: reading it is the failure
        compiling = False

        def get(self):
            raise AssertionError("ContextVar.get called while compiling")

    monkeypatch.setattr(fused_encoder, "_COLLECTOR", [Untraceable()])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused_encoder._capturing() is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.raises(AssertionError, match="while compiling"):  # eager: the variable itself is read
        fused_encoder._capturing()


@needs_op
def test_plan_repr_verify_unpatch():
    model = _patched(verify=True)
    assert model.bsbert_verify_report.passed
    enc = model.bert.encoder
    assert fused_encoder.installed(enc)  # back after verify swapped the original modules in and out
    assert "fused encoder" in repr(enc) and "one C++ op" in model.bsbert_plan.table(16)
    bsbert.unpatch(model)
    assert not fused_encoder.installed(enc) and "_bsbert_program" not in vars(enc)
    off = _patched(fused_encoder=False)
    assert not off.bsbert_plan.fused_encoder and off.bsbert_plan.fused_encoder_reason == "fused_encoder=False"
    assert not fused_encoder.installed(off.bert.encoder)


@needs_op
def test_save_load_keeps_it(tmp_path):
    model = _patched()
    inp = inputs(batch=2, seq=13, pad_from=6)
    ref = _run(model, inp)
    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="heuristic")
    assert loaded.bsbert_plan.fused_encoder and fused_encoder.installed(loaded.bert.encoder)
    assert torch.equal(_run(loaded, inp).start_logits, ref.start_logits)


def test_declines_with_a_reason():
    model = tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0))  # a layer without heads
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    assert not model.bsbert_plan.fused_encoder
    assert model.bsbert_plan.fused_encoder_reason
    model = tiny_pruned(heads=HEADS, ffn=FFN)
    bsbert.patch(model, progress=False, attention="torch-sdpa", select="heuristic")
    assert "attention backend torch-sdpa" in model.bsbert_plan.fused_encoder_reason


@needs_op
def test_declines_layer_norm_weights_the_kernel_does_not_take():
    model = _patched()
    ln = model.bert.encoder.layer[2].output.LayerNorm
    ln.weight.data = ln.weight.data.half()
    why = fused_encoder.program(model.bert.encoder.layer, torch.float32)
    assert isinstance(why, str) and "layer 2: LayerNorm weights in torch.float16" in why


@needs_op
def test_op_errors_name_the_problem():
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="20 tensors, 18 ints and 3 floats per layer"):
        torch.ops.bsbert.bert_encoder(x, None, [None] * 19, [0] * 18, [1.0, 1e-12, 1e-12])
    with pytest.raises(RuntimeError, match=r"hidden must be \[B, S, hidden_size\]"):
        torch.ops.bsbert.bert_encoder(x[0], None, [], [], [])
    # torch's uint16-uint64 passed the integer check, then failed in the scan with an error naming an internal
    # function ("attention_padding_mask" not implemented for 'UInt16')
    with pytest.raises(RuntimeError, match=r"int8-int64 or uint8\), got UInt16"):
        torch.ops.bsbert.bert_encoder(x, torch.ones(1, 4, dtype=torch.uint16), [], [], [])
    # a bool mask of another shape was taken when no layer's attention saw it
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \[1, 4\]"):
        torch.ops.bsbert.bert_encoder(x, torch.ones(7, 9, dtype=torch.bool), [], [], [])
    with pytest.raises(RuntimeError, match="crow_indices .* is None"):
        torch.ops.bsbert.bert_encoder(x, None, [None] * 20, [1, 8] + [0, 8, 8, 32] * 4, [1.0, 1e-12, 1e-12])
    with pytest.raises(RuntimeError, match="linear kind must be 0 .*, 1 .* or 2 .*, got 3"):
        torch.ops.bsbert.bert_encoder(x, None, [None] * 20, [1, 8] + [3, 8, 8, 0] * 4, [1.0, 1e-12, 1e-12])
    with pytest.raises(RuntimeError, match="weight .* is None"):
        torch.ops.bsbert.bert_encoder(x, None, [None] * 20, [1, 8] + [2, 8, 8, 0] * 4, [1.0, 1e-12, 1e-12])


@needs_op
def test_chained_layer_errors_are_raised_from_inside_the_attention_region():
    # a chained layer's linears are checked by the calling thread inside the attention's parallel region:
    # a bad argument there still surfaces as the op's own error, naming the problem
    model = _patched(backend="cpu-bsr")
    prog = model.bert.encoder._bsbert_program
    hidden = torch.randn(2, 30, 128)
    ln_error = r"(add_layer_norm: weight|bsr_linear_add_layer_norm: ln_weight) must have shape \[128\]"
    # the error names the layer and which of its LayerNorms (the kernels' own words name neither)
    for index, where in ((fused_encoder.TENSORS_PER_LAYER - 4, "layer 0, attention output \\+ LayerNorm"),
                         (2 * fused_encoder.TENSORS_PER_LAYER - 2, "layer 1, FFN out \\+ LayerNorm")):
        tensors = list(prog.tensors)
        tensors[index] = torch.ones(127)  # a LayerNorm weight of the wrong width
        with pytest.raises(RuntimeError, match=ln_error + r".*\(bert_encoder: " + where + r"\)"):
            torch.ops.bsbert.bert_encoder(hidden, None, tensors, prog.ints, prog.floats)
    out = torch.ops.bsbert.bert_encoder(hidden, None, prog.tensors, prog.ints, prog.floats)  # still fine after
    assert torch.isfinite(out).all()


@needs_op
def test_opcheck():
    model = _patched()
    prog = model.bert.encoder._bsbert_program
    hidden = torch.randn(2, 7, 128)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False
    cases = [(torch.ops.bsbert.bert_encoder.default, (hidden, kpm, prog.tensors, prog.ints, prog.floats))]
    if _ext.has_op("bert_encoder_registered"):
        with torch.inference_mode():
            prog.run(hidden, kpm)  # registers the lists
        cases.append((torch.ops.bsbert.bert_encoder_registered.default, (hidden, kpm, prog._registered.handle)))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _registry():
    return _ext.load(warn=False)


needs_registry = pytest.mark.skipif(not _ext.has_op("bert_encoder_registered"),
                                    reason="bsbert::bert_encoder_registered unavailable")


@needs_op
@needs_registry
@pytest.mark.parametrize("backend", ["cpu-bsr", "onednn-dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_form_is_the_list_op_bit_for_bit(backend, dtype):
    model = _patched(dtype, backend=backend)
    prog = model.bert.encoder._bsbert_program
    hidden = torch.randn(2, 30, 128).to(dtype)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, 21:] = False
    with torch.inference_mode():
        listed = torch.ops.bsbert.bert_encoder(hidden, kpm, prog.tensors, prog.ints, prog.floats)
        ran = prog.run(hidden, kpm)
        again = prog.run(hidden, None)
        listed_nomask = torch.ops.bsbert.bert_encoder(hidden, None, prog.tensors, prog.ints, prog.floats)
    assert prog._registered not in (None, False)
    assert torch.equal(ran, listed) and torch.equal(again, listed_nomask)


@needs_op
@needs_registry
def test_registration_lives_as_long_as_the_program():
    import copy
    import gc

    mod = _registry()
    gc.collect()
    base = mod.encoder_registered_count()
    model = _patched(backend="cpu-bsr")
    inp = inputs(batch=2, seq=12, pad_from=7)
    ref = _run(model, inp).start_logits
    assert mod.encoder_registered_count() == base + 1
    twin = copy.deepcopy(model)  # the copy registers its own tensors, on its own first run
    assert twin.bert.encoder._bsbert_program._registered is None
    assert torch.equal(_run(twin, inp).start_logits, ref)
    assert mod.encoder_registered_count() == base + 2
    handle = model.bert.encoder._bsbert_program._registered.handle
    del model
    gc.collect()
    assert mod.encoder_registered_count() == base + 1  # the original's released; the copy still runs
    assert torch.equal(_run(twin, inp).start_logits, ref)
    with pytest.raises(RuntimeError, match=f"no encoder is registered under handle {handle}"):
        torch.ops.bsbert.bert_encoder_registered(torch.randn(1, 3, 128), None, handle)
    bsbert.unpatch(twin)
    del twin
    gc.collect()
    assert mod.encoder_registered_count() == base


@needs_op
@needs_registry
def test_registration_checks_the_lists_like_the_op():
    mod = _registry()
    base = mod.encoder_registered_count()
    with pytest.raises(RuntimeError, match="20 tensors, 18 ints and 3 floats per layer"):
        mod.encoder_register([None] * 19, [0] * 18, [1.0, 1e-12, 1e-12])
    with pytest.raises(RuntimeError, match="linear kind must be 0 .*, 1 .* or 2 .*, got 3"):
        mod.encoder_register([None] * 20, [1, 8] + [3, 8, 8, 0] * 4, [1.0, 1e-12, 1e-12])
    with pytest.raises(RuntimeError, match="layer 0 has 0 heads"):
        mod.encoder_register([torch.ones(1)] * 20, [0, 8] + [2, 8, 8, 0] * 4, [1.0, 1e-12, 1e-12])
    assert mod.encoder_registered_count() == base  # nothing kept from a failed registration
    assert mod.encoder_release(-5) is False


def _registered_and_listed(prog, hidden, kpm=None):
    """(the registered op's output, the list op's: every chain prepared afresh) on the same input."""
    with torch.inference_mode():
        return (prog.run(hidden, kpm),
                torch.ops.bsbert.bert_encoder(hidden, kpm, prog.tensors, prog.ints, prog.floats))


@needs_op
@needs_registry
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_chains_compute_what_fresh_chains_compute(monkeypatch, dtype):
    # A registered encoder keeps the row chains of its middle layers between calls (the first layer's
    # residual is the op's input, the last layer's output a new tensor each call): on fresh inputs, after
    # a shape, thread-count or ISA change and with a bias edited in place, its output stays the list
    # op's (which prepares every chain on every call), bit for bit.
    from tests.helpers import cpu_isa_levels

    mod = _registry()
    heads, ffn = (2, 3, 4, 2, 3), (100, 37, 64, 50, 20)
    model = tiny_pruned(heads=heads, ffn=ffn).to(dtype)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic", backend="cpu-bsr")
    prog = model.bert.encoder._bsbert_program
    old = torch.get_num_threads()
    g = torch.Generator().manual_seed(1)

    def check(batch, seq, kept, kpm=None):
        hidden = torch.randn(batch, seq, 128, generator=g).to(dtype)
        ran, listed = _registered_and_listed(prog, hidden, kpm)
        assert torch.equal(ran, listed), (batch, seq)
        assert mod.encoder_cached_chains(prog._registered.handle) == kept
        return ran

    try:
        torch.set_num_threads(2)
        first = check(2, 30, kept=3)  # layers 1-3 of 5
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[0, 17:] = False
        for _ in range(2):
            check(2, 30, kept=3)
            check(2, 30, kept=3, kpm=mask)
        check(1, 23, kept=3)  # 23 rows: under row tiles on two threads (no chains; the kept ones wait)
        check(2, 30, kept=3)
        check(3, 41, kept=3)  # another shape: prepared again
        check(2, 30, kept=3)
        torch.set_num_threads(1)
        check(2, 30, kept=3)
        torch.set_num_threads(2)
        for isa in cpu_isa_levels(bf16_level=True)[-2:]:  # the two best levels this CPU runs
            monkeypatch.setenv("BSBERT_CPU_ISA", isa)
            check(2, 30, kept=3)
        monkeypatch.delenv("BSBERT_CPU_ISA")
        # a bias edited in place after registration: seen (the kept chains copy their biases each call)
        bias = prog.tensors[1 * fused_encoder.TENSORS_PER_LAYER + 2 * 4 + 3]  # layer 1's FFN in
        with torch.no_grad():
            bias.add_(1.0)
        hidden = torch.randn(2, 30, 128, generator=g).to(dtype)
        ran, listed = _registered_and_listed(prog, hidden)
        with torch.no_grad():
            bias.sub_(1.0)
        before, _ = _registered_and_listed(prog, hidden)
        assert torch.equal(ran, listed) and not torch.equal(ran, before)
        monkeypatch.setenv("BSBERT_ENCODER_CHAIN_CACHE", "0")  # every chain prepared on every call
        off, listed = _registered_and_listed(prog, hidden)
        assert torch.equal(off, listed) and torch.equal(off, before)
        monkeypatch.delenv("BSBERT_ENCODER_CHAIN_CACHE")
        _registered_and_listed(prog, hidden)  # chains kept again
        keep = bias.data
        bias.data = torch.zeros(bias.numel() + 40, dtype=bias.dtype)  # another size: an error, not an overrun
        with pytest.raises(RuntimeError, match="bias of a prepared row chain changed to shape"):
            with torch.inference_mode():
                prog.run(hidden, None)
        bias.data = keep
        ran, listed = _registered_and_listed(prog, hidden)
        assert torch.equal(ran, listed) and torch.equal(ran, before)
    finally:
        torch.set_num_threads(old)
    assert first.shape == (2, 30, 128)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_attention_masks(dtype):
    # The op takes transformers' integer attention mask as it is (nonzero = attend): the same bits as the
    # bool mask it stands for, and as no mask when it has no zero (both op forms); a float mask is refused.
    model = _patched(dtype, backend="cpu-bsr")
    prog = model.bert.encoder._bsbert_program
    hidden = torch.randn(2, 21, 128).to(dtype)
    am = torch.ones(2, 21, dtype=torch.long)
    am[1, 13:] = 0
    with torch.inference_mode():
        for run in (lambda m: prog.run(hidden, m),
                    lambda m: torch.ops.bsbert.bert_encoder(hidden, m, prog.tensors, prog.ints, prog.floats)):
            want = run(am.bool())
            assert torch.equal(run(am), want) and torch.equal(run(am.int() * 3), want)
            assert torch.equal(run(am[:, ::1].t().contiguous().t()), want)  # not contiguous
            assert torch.equal(run(torch.ones(2, 21, dtype=torch.int32)), run(None))
            assert not torch.equal(want, run(None))
            with pytest.raises(RuntimeError, match="key_padding_mask must be bool .*or an integer attention mask"):
                run(am.float())


@needs_op
def test_hook_check_is_skipped_only_while_no_hook_was_registered(monkeypatch):
    from torch.utils.hooks import RemovableHandle

    model = _patched()
    inp = inputs(batch=1, seq=15)
    prog = model.bert.encoder._bsbert_program
    calls = _called(monkeypatch)
    _run(model, inp)
    assert calls == [1] and prog.no_hooks_at == RemovableHandle.next_id  # the dicts were found empty
    seen = []
    # written into a module's dict without torch's API: not looked for while the counter stands (the
    # documented limit, shown here to prove the dicts are not looked at)
    dense = model.bert.encoder.layer[2].output.dense
    dense._forward_hooks[-1] = lambda *a: seen.append("direct")
    _run(model, inp)
    assert calls == [1, 1] and seen == []
    h = dense.register_forward_hook(lambda *a: seen.append("api"))  # the counter moves: looked at again
    _run(model, inp)
    assert calls == [1, 1] and sorted(seen) == ["api", "direct"]
    h.remove()
    del dense._forward_hooks[-1]
    _run(model, inp)  # looked at (nothing registered, but the last look found hooks), found none
    assert calls == [1, 1, 1] and prog.no_hooks_at == RemovableHandle.next_id
    twin = copy.deepcopy(model)  # a copy looks at its own modules first
    assert twin.bert.encoder._bsbert_program.no_hooks_at == -1


@needs_op
@needs_registry
def test_a_layer_norm_pair_of_two_dtypes_is_not_kept():
    # bf16 model, one LayerNorm with an fp32 weight and a bf16 bias: a chain would hold an fp32 copy of
    # the pair, so that layer's chain is prepared on every call and an in-place edit of the weight is seen.
    mod = _registry()
    model = tiny_pruned(heads=(2, 3, 4, 2, 3), ffn=(100, 37, 64, 50, 20)).to(torch.bfloat16)
    ln = model.bert.encoder.layer[2].attention.output.LayerNorm
    ln.weight.data = ln.weight.data.float()
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic", backend="cpu-bsr")
    prog = model.bert.encoder._bsbert_program
    hidden = torch.randn(2, 30, 128).to(torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ran, listed = _registered_and_listed(prog, hidden)
        assert torch.equal(ran, listed) and mod.encoder_cached_chains(prog._registered.handle) == 2
        w = prog.tensors[2 * fused_encoder.TENSORS_PER_LAYER + 16]  # layer 2's attention LayerNorm weight
        assert w.dtype == torch.float32
        with torch.no_grad():
            w.mul_(1.5)
        ran2, listed2 = _registered_and_listed(prog, hidden)
        assert torch.equal(ran2, listed2) and not torch.equal(ran2, ran)
    finally:
        torch.set_num_threads(old)


def _edit_layer_list(model, how):
    enc = model.bert.encoder
    if how == "del":
        del enc.layer[2]
    elif how == "slice":
        enc.layer = enc.layer[:2]  # another ModuleList in its place
    elif how == "setitem":
        enc.layer[0] = enc.layer[2]
    elif how == "append":
        enc.layer.append(copy.deepcopy(enc.layer[2]))
    elif how == "insert":
        enc.layer.insert(1, copy.deepcopy(enc.layer[0]))  # written into the ModuleList's dict: no hook
    elif how == "direct":
        enc.layer._modules["1"] = copy.deepcopy(enc.layer[2])  # past every hook and counter


@needs_op
@pytest.mark.parametrize("how", ["del", "slice", "setitem", "append", "insert", "direct"])
def test_an_edited_layer_list_is_never_run_as_the_old_one(monkeypatch, how):
    # the op runs the layers it was given: after the encoder's ModuleList is edited (or replaced) it would
    # compute the old stack (rel err 2.6e-2..3.9e-2 on this model): the per-layer path runs the new one
    model = _patched()
    inp = inputs(batch=2, seq=13, pad_from=6)
    calls = _called(monkeypatch)
    before = _run(model, inp)
    assert calls == [1]
    _edit_layer_list(model, how)
    fused, per_layer = _both(model, inp)
    assert calls == [1]  # stale: the per-layer path ran (both times)
    assert torch.equal(fused.start_logits, per_layer.start_logits)
    assert not torch.equal(fused.start_logits, before.start_logits)
    enc = model.bert.encoder
    fused_encoder.uninstall(enc)  # reinstalled on the new list: fused again, the same bits
    assert fused_encoder.install(enc, enc.layer, 128, torch.float32) is None
    again = _run(model, inp)
    assert calls == [1, 1] and torch.equal(again.start_logits, per_layer.start_logits)


def test_install_needs_the_encoders_layer_list():
    model = tiny_pruned(heads=HEADS, ffn=FFN)
    enc = model.bert.encoder
    why = fused_encoder.install(enc, list(enc.layer), 128, torch.float32)  # a copy: its edits would be missed
    assert "not a ModuleList of the encoder" in why and not fused_encoder.installed(enc)


def _double(norm):
    import torch.nn.utils.parametrize as parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return w * 2

    parametrize.register_parametrization(norm, "weight", Double())


@needs_op
@pytest.mark.parametrize("edit", [
    lambda m: setattr(m.bert.encoder.layer[0].output.LayerNorm, "eps", 0.5),
    lambda m: setattr(m.bert.encoder.layer[2].attention.output.LayerNorm, "eps", 0.3),
    lambda m: setattr(m.bert.encoder.layer[0].output.LayerNorm, "weight",
                      torch.nn.Parameter(m.bert.encoder.layer[0].output.LayerNorm.weight.detach() * 2)),
    lambda m: setattr(m.bert.encoder.layer[1].attention.output.LayerNorm, "bias",
                      torch.nn.Parameter(m.bert.encoder.layer[1].attention.output.LayerNorm.bias.detach() + 1)),
    lambda m: m.bert.encoder.layer[1].output.LayerNorm.register_parameter(
        "weight", torch.nn.Parameter(m.bert.encoder.layer[1].output.LayerNorm.weight.detach() * 3)),
    lambda m: _double(m.bert.encoder.layer[0].output.LayerNorm),  # swaps the module's class too
    lambda m: setattr(m.bert.encoder.layer[0].attention.self, "scale", 1.0),
], ids=["eps", "eps_attention", "weight_param", "bias_param", "register_parameter", "parametrize", "scale"])
def test_layer_norm_and_scale_changes_are_never_computed_with_the_old_ones(monkeypatch, edit):
    # the op holds the LayerNorms' weight / bias tensors and the eps / scale numbers it was given: a new
    # Parameter, a parametrization or another number would leave it computing the old LayerNorm (rel err
    # 2.8e-3..6.1e-3) or scale (4e-4 off the per-layer path): the per-layer path, which reads them, runs
    model = _patched()
    inp = inputs(batch=2, seq=13, pad_from=6)
    calls = _called(monkeypatch)
    before = _run(model, inp)
    edit(model)
    fused, per_layer = _both(model, inp)
    assert calls == [1]
    assert torch.equal(fused.start_logits, per_layer.start_logits)
    assert not torch.equal(fused.start_logits, before.start_logits)


@needs_op
def test_an_equal_eps_or_scale_keeps_the_op(monkeypatch):
    # eps / scale are compared by value: the same number set again (another float object) is no change
    model = _patched()
    inp = inputs(batch=1, seq=9)
    calls = _called(monkeypatch)
    layer = model.bert.encoder.layer[1]
    layer.output.LayerNorm.eps = float(repr(layer.output.LayerNorm.eps))
    layer.attention.self.scale = float(repr(layer.attention.self.scale))
    _run(model, inp)
    assert calls == [1]


@needs_op
@pytest.mark.parametrize("edit", ["eps", "choice"])
def test_a_copied_program_watches_the_copys_modules(monkeypatch, edit):
    # a deep copy's modules get fresh __dict__s (nn.Module.__setstate__ fills them): the copy's program must
    # watch those, not copies of the original's (an eps or choice set on the copy went unseen)
    from bsbert.ops.linear_backends import OneDnnDense

    twin = copy.deepcopy(_patched())
    inp = inputs(batch=2, seq=13, pad_from=6)
    calls = _called(monkeypatch)
    before = _run(twin, inp)
    layer = twin.bert.encoder.layer[0]
    if edit == "eps":
        layer.output.LayerNorm.eps = 0.5
    else:
        lin = layer.attention.self.qkv
        choice = copy.copy(lin.choice)
        choice.prepared = OneDnnDense().prepare(lin.packed_weight() * 2, lin.bias, False, None)
        choice.backend = OneDnnDense.name
        lin.choice = choice
    fused, per_layer = _both(twin, inp)
    assert calls == [1]
    assert torch.equal(fused.start_logits, per_layer.start_logits)
    assert not torch.equal(fused.start_logits, before.start_logits)


@needs_op
@needs_registry
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_reuses_its_kept_chains(dtype):
    # The patched model's plain forwards go through the registered encoder, whose middle layers' kept row
    # chains must run again on every call after the first (each kept chain is reused only while the
    # tensors it reads are unchanged: a stamp that never matched would prepare them all on every call, a
    # silent ~0.4% loss with the same outputs)
    mod = _registry()
    model = tiny_pruned(heads=(2, 3, 4, 2, 3), ffn=(100, 37, 64, 50, 20)).to(dtype)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic", backend="cpu-bsr")
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # (row chains need row tiles on two threads at these 2 x 30 rows)
    try:
        inp = inputs(batch=2, seq=30, vocab=model.config.vocab_size)
        with torch.inference_mode():
            first = model(**inp).start_logits
            handle = model.bert.encoder._bsbert_program._registered.handle
            kept, reused = mod.encoder_cached_chains(handle), mod.encoder_chain_reuses(handle)
            assert kept == 3 and reused == 0  # layers 1-3 of 5, prepared on the first call
            for n in (1, 2):
                assert torch.equal(model(**inp).start_logits, first)
                assert mod.encoder_chain_reuses(handle) == n * kept
    finally:
        torch.set_num_threads(old)
        bsbert.unpatch(model)


@needs_op
def test_no_layers_returns_a_contiguous_copy():
    # as the fake kernel says: clone() kept a non-contiguous hidden's strides (opcheck: stride mismatch)
    x = torch.randn(5, 3, 8).transpose(0, 1)
    out = torch.ops.bsbert.bert_encoder(x, None, [], [], [])
    assert out.is_contiguous() and torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    torch.library.opcheck(torch.ops.bsbert.bert_encoder.default, (x, None, [], [], []))


@needs_op
@pytest.mark.parametrize("fused", [True, False])
def test_measured_attention_keeps_the_cpu_kernel_when_close_so_the_encoder_stays_fused(monkeypatch, fused):
    """One layer whose SDPA timed a few percent faster (noise, on a 2-core VM) turned the fused encoder off for
    every layer. Now bsbert's cpu kernel is kept within PREFER_WITHIN of the fastest when the fused encoder
    wants it (and only then); clearly slower, it is not."""
    from bsbert.ops import attention_backends, dispatch

    real = dispatch.rank_by_time
    ratio = {"cpu": 1.05}

    def fake(fns, x, what, gpu=False):
        if "cpu" not in fns or "torch-sdpa" not in fns:  # the linears' candidates: measured for real
            return real(fns, x, what, gpu)
        ms = {"torch-sdpa": 1.0, "cpu": ratio["cpu"]}
        order = sorted(ms, key=ms.get)
        return order, ms, "measured (fake): " + " < ".join(f"{k} {ms[k]:.2f}ms" for k in order)

    monkeypatch.setattr(dispatch, "rank_by_time", fake)
    model = tiny_pruned(heads=HEADS, ffn=FFN)
    bsbert.patch(model, progress=False, select="measure", tokens=64, fused_encoder=fused, check_model=False)
    plan = model.bsbert_plan
    want = "cpu" if fused else "torch-sdpa"
    assert [lp.attention_backend for lp in plan.layers] == [want] * len(HEADS), plan.table()
    assert plan.fused_encoder is fused, plan.fused_encoder_reason
    if fused:
        assert all("cpu kept: within 10% of torch-sdpa" in lp.attention_reason for lp in plan.layers)
    bsbert.unpatch(model)
    ratio["cpu"] = attention_backends.PREFER_WITHIN + 0.05  # clearly slower: SDPA, and a plan that says why
    bsbert.patch(model, progress=False, select="measure", tokens=64, fused_encoder=fused, check_model=False)
    assert [lp.attention_backend for lp in model.bsbert_plan.layers] == ["torch-sdpa"] * len(HEADS)
    assert "attention backend torch-sdpa" in model.bsbert_plan.fused_encoder_reason or not fused


@needs_op
def test_switches_take_the_same_off_spellings_as_the_python_ones(monkeypatch):
    """The C++ switches tested the first character only: BSBERT_ENCODER_CHAIN=false or =off left the row
    chains on; BSBERT_NVTX=true was ignored on the Python side."""
    from bsbert import _C, nvtx

    for value, on in [("0", False), ("false", False), (" OFF ", False), ("No", False), ("1", True),
                      ("true", True), ("on", True), ("", True), ("offline", True)]:
        monkeypatch.setenv("BSBERT_ENCODER_CHAIN", value)
        assert _C.env_switch_on("BSBERT_ENCODER_CHAIN") is on, value
    monkeypatch.delenv("BSBERT_ENCODER_CHAIN")
    assert _C.env_switch_on("BSBERT_ENCODER_CHAIN")
    for value, on in [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)]:
        monkeypatch.setenv("BSBERT_NVTX", value)
        assert nvtx.env_enabled() is on, value


@needs_op
def test_chain_cache_switched_off_by_word_prepares_every_call(monkeypatch):
    mod = _registry()
    model = tiny_pruned(heads=(2, 3, 4, 2, 3), ffn=(100, 37, 64, 50, 20))
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic", backend="cpu-bsr")
    monkeypatch.setenv("BSBERT_ENCODER_CHAIN_CACHE", "off")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inp = inputs(batch=2, seq=30, vocab=model.config.vocab_size)
        with torch.inference_mode():
            for _ in range(3):
                model(**inp)
            assert mod.encoder_chain_reuses(model.bert.encoder._bsbert_program._registered.handle) == 0
    finally:
        torch.set_num_threads(old)
        bsbert.unpatch(model)
