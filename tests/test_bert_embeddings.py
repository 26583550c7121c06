"""``torch.ops.bsbert.bert_embeddings`` (csrc/cpu/bert_embeddings.cpp) equals transformers' BertEmbeddings
bit for bit (the same two rounded adds, torch's own LayerNorm), raises clear errors for bad input, and
is what a patched BertModel's lean forward runs when the call allows it (bsbert.lean_model)."""
import pytest
import torch

import bsbert
from bsbert import _ext, lean_model
from tests.helpers import cpu_isa_levels, inputs, tiny_config, tiny_pruned, with_threads
from tests.helpers import qa_outputs_itself  # noqa: F401  (the fixture pytestmark names)

# these tests compare forward paths bit for bit: the QA head runs qa_outputs itself (see helpers)
pytestmark = pytest.mark.usefixtures("qa_outputs_itself")

needs_op = pytest.mark.skipif(not _ext.has_op("bert_embeddings"),
                              reason=f"bsbert::bert_embeddings unavailable: {_ext.reason_unavailable()}")
if _ext.available():
    import bsbert.ops.fake  # noqa: F401  (registers the fake kernel used by opcheck)


def _embeddings(dtype, hidden=48, vocab=97, types=3, positions=40, seed=0):
    from transformers.models.bert.modeling_bert import BertEmbeddings

    torch.manual_seed(seed)
    cfg = tiny_config(hidden=hidden, heads=4)
    cfg.vocab_size, cfg.type_vocab_size, cfg.max_position_embeddings = vocab, types, positions
    emb = BertEmbeddings(cfg).eval()
    with torch.no_grad():  # LayerNorm affine away from (1, 0), so a swapped or skipped one shows
        emb.LayerNorm.weight.uniform_(0.5, 1.5)
        emb.LayerNorm.bias.uniform_(-0.5, 0.5)
    return emb.to(dtype)


def _op(emb, ids, tt=None, **over):
    a = dict(word=emb.word_embeddings.weight, position=emb.position_embeddings.weight,
             token_type=emb.token_type_embeddings.weight, ln_weight=emb.LayerNorm.weight, ln_bias=emb.LayerNorm.bias)
    a.update(over)
    return torch.ops.bsbert.bert_embeddings(ids, tt, a["word"], a["position"], a["token_type"], a["ln_weight"],
                                            a["ln_bias"], emb.LayerNorm.eps)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 17), (3, 40), (1, 33)])
@pytest.mark.parametrize("with_types", [False, True])
def test_bit_for_bit_transformers(monkeypatch, dtype, batch, seq, with_types):
    emb = _embeddings(dtype, seed=seq)
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    ids[0, 0] = 96  # the last row of the word table
    tt = torch.randint(0, 3, (batch, seq), generator=g) if with_types else None
    with torch.inference_mode():
        ref = emb(input_ids=ids, token_type_ids=tt)
        for isa in cpu_isa_levels():  # the baseline and the AVX-512 copy of the sum loop
            monkeypatch.setenv("BSBERT_CPU_ISA", isa)
            for threads in (1, 2, 3):
                for prefetch in ("1", "0"):  # the rows-ahead prefetch (on by default) changes no value
                    monkeypatch.setenv("BSBERT_EMB_PREFETCH", prefetch)
                    got = with_threads(threads, lambda: _op(emb, ids, tt))
                    assert got.dtype == dtype and got.shape == (batch, seq, 48)
                    assert torch.equal(got, ref), f"{isa}, {threads} threads, prefetch {prefetch}"


@needs_op
def test_fp32_layernorm_weights_with_bf16_tables():
    emb = _embeddings(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 9))
    w, b = emb.LayerNorm.weight.float(), emb.LayerNorm.bias.float()
    got = _op(emb, ids, ln_weight=w, ln_bias=b)
    ref = torch.nn.functional.layer_norm(_sum(emb, ids), (48,), w, b, emb.LayerNorm.eps)
    assert torch.equal(got, ref)


def _sum(emb, ids):
    s = ids.shape[1]
    return (emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids))) + \
        emb.position_embeddings(torch.arange(s))[None]


@needs_op
@pytest.mark.parametrize("case,message", [
    ("id too large", "input_ids holds 97 at flat position 3, outside the 97 rows of the word table"),
    ("negative id", "input_ids holds -1"),
    ("type too large", "token_type_ids holds 3"),
    ("int32 ids", "input_ids must be int64"),
    ("1-d ids", "input_ids must be [batch, seq]"),
    ("too long", "sequence length 41 exceeds the 40 rows of the position table"),
    ("float16 tables", "tables must be float32 or bfloat16"),
    ("mixed tables", "position is BFloat16, the word table Float"),
    ("hidden mismatch", "token_type has hidden size 8"),
    ("bad ln weight", "ln_weight must be a CPU [48] tensor"),
    ("types shape", "token_type_ids must be a CPU int64 tensor of input_ids' shape"),
    ("no type rows", "token-type table has no rows"),
])
def test_errors_name_the_problem(case, message):
    emb = _embeddings(torch.float32)
    ids = torch.randint(0, 97, (2, 5))
    kw, tt = {}, None
    if case == "id too large":
        ids[0, 3] = 97
    elif case == "negative id":
        ids[1, 0] = -1
    elif case == "type too large":
        tt = torch.full_like(ids, 3)
    elif case == "int32 ids":
        ids = ids.int()
    elif case == "1-d ids":
        ids = ids[0]
    elif case == "too long":
        ids = torch.zeros(1, 41, dtype=torch.long)
    elif case == "float16 tables":
        kw = {k: getattr(emb, m).weight.half() for k, m in (("word", "word_embeddings"),
                                                            ("position", "position_embeddings"),
                                                            ("token_type", "token_type_embeddings"))}
    elif case == "mixed tables":
        kw = {"position": emb.position_embeddings.weight.bfloat16()}
    elif case == "hidden mismatch":
        kw = {"token_type": torch.zeros(3, 8)}
    elif case == "bad ln weight":
        kw = {"ln_weight": torch.ones(47)}
    elif case == "types shape":
        tt = torch.zeros(2, 4, dtype=torch.long)
    elif case == "no type rows":
        kw = {"token_type": torch.zeros(0, 48)}
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _op(emb, ids, tt, **kw)


@needs_op
def test_opcheck():
    emb = _embeddings(torch.float32)
    ids = torch.randint(0, 97, (2, 7))
    tt = torch.randint(0, 3, (2, 7))
    args = (ids, tt, emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach(),
            emb.token_type_embeddings.weight.detach(), emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach(),
            emb.LayerNorm.eps)
    torch.library.opcheck(torch.ops.bsbert.bert_embeddings.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _count_op_calls(monkeypatch):
    """[n]: how many lean forwards computed their embeddings with the op."""
    used = [0]
    orig = lean_model._embeddings_op

    def counting(*a, **k):
        out = orig(*a, **k)
        used[0] += out is not None
        return out
    monkeypatch.setattr(lean_model, "_embeddings_op", counting)
    return used


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_uses_it_and_steps_aside(monkeypatch, dtype):
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37)).to(dtype)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    assert lean_model.installed(model.bert)
    used = _count_op_calls(monkeypatch)
    inp = inputs(batch=2, seq=13, pad_from=9)
    emb = model.bert.embeddings
    with torch.inference_mode():
        out = model(**inp)
        assert used[0] == 1
        # the embeddings module's output feeds the same encoder: the same logits, bit for bit
        lean_model.detach(model.bert)
        ref = model(**inp)
        lean_model.attach(model.bert)
        assert torch.equal(out.start_logits, ref.start_logits) and torch.equal(out.end_logits, ref.end_logits)
        model(**inp, position_ids=torch.arange(13).expand(2, 13))  # custom positions: the module
        h = emb.LayerNorm.register_forward_hook(lambda *a: None)
        model(**inp)  # a hook on it: the module, so the hook runs
        h.remove()
        emb.train()
        model(**inp)  # training: dropout is the module's
        emb.eval()
        assert used[0] == 1
        model(**inp, token_type_ids=torch.ones(2, 13, dtype=torch.long))
        assert used[0] == 2


@needs_op
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(shape):
    emb = _embeddings(torch.float32)
    ids = torch.zeros(shape, dtype=torch.long)
    with torch.inference_mode():
        got = _op(emb, ids)
    assert got.shape == (*shape, 48) and got.dtype == torch.float32
