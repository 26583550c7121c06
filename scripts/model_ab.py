"""In-process A/B of one patched-model feature on the seed-like BERT-large (CPU): the same patched model
with the feature off and on, timed in interleaved rounds (best round counts), so a busy shared machine
slows both alike. Outputs are checked to be identical first.

    python scripts/model_ab.py fused-tail --seq 128 --rounds 30
    python scripts/model_ab.py fast-layers --seq 384 --rounds 12
    python scripts/model_ab.py row-split --seq 128
    python scripts/model_ab.py balanced-panels --seq 128
    python scripts/model_ab.py fused-encoder --seq 128
    python scripts/model_ab.py lean-model --seq 128
    python scripts/model_ab.py row-split --seq 128 --dtype bfloat16
    python scripts/model_ab.py huge-pages --seq 128 --dtype bfloat16
    python scripts/model_ab.py encoder-chain --seq 128 --dtype bfloat16
    python scripts/model_ab.py embeddings-op --seq 128 --dtype bfloat16 --rounds 40
    python scripts/model_ab.py lean-head --seq 128 --dtype bfloat16 --rounds 40
    python scripts/model_ab.py qa-head-kernel --seq 128 --dtype bfloat16 --rounds 60
    python scripts/model_ab.py chain-cache --seq 128 --dtype bfloat16 --paired 600

--paired N: instead of best rounds, N forwards each, off and on alternating forward by forward (the
order flipped every pair), reporting both medians and the median of the per-pair on/off ratios (a
change under 1% is below the best-round comparison's resolution on the shared 2-core VM). --block K
alternates blocks of K forwards instead (the first of each untimed, the pair's ratio from the blocks'
medians), for changes whose effect carries from one forward to the next through the caches.

Each mode patches the model as `patch` does by default (fused encoder, lean forwards) unless said, and
times only what its switch changes, except where "also off" says otherwise: a feature that needs the
switched one cannot run in the off arm (the off arm takes the class's own forward from there on).

fused-tail: output projections on cpu-bsr run bsr_linear_add_layer_norm (on) or bsr_linear then
add_layer_norm (off). Patched with fused_encoder=False in both arms: the fused encoder runs its own
kernels and never takes this switch, so with it the two arms ran the same ops (and without it the lean
BertModel / QA forwards are off too).
fast-layers: bsbert's lean layer forward (on) or transformers' (off). Also off: the fused encoder, the
lean BertModel forward (bsbert::bert_embeddings) and the lean QA forward's bsbert::head_logits, which all
need the lean layers: the off arm is transformers' whole model on bsbert's modules.
row-split: bsr_linear's default work split (whole rows per thread from M = 2 register tiles per thread
up; on) or BSBERT_BSR_SPLIT=blocks (off). balanced-panels: a row-split tile's rows in near-equal
register-tile panels (on) or BSBERT_BSR_PANELS=aligned (off: panels of 12 rows and a short last one).
fused-encoder: the whole encoder as one op, bsbert::bert_encoder (on), or layer by layer (off). Also off:
the lean BertModel forward (bsbert::bert_embeddings) and the lean QA forward's bsbert::head_logits, which
need the fused encoder.
huge-pages: the block-sparse linears' packed weights in the 2 MiB pages patch put them in (on) or in
copies from torch's allocator (off; bsbert.hugepages).
encoder-chain: inside the fused encoder, each layer's attention output, FFN in, FFN out and the next
layer's QKV run as one row-tile region (on; bsbert::cpu::BsrRowChain) or one op call each
(BSBERT_ENCODER_CHAIN=0).
lean-model: BertModel's lean forward (on) or transformers' BertModel.forward (off), encoder fused in both.
Also off: the lean QA forward (bsbert::head_logits), which needs the lean BertModel.
lean-head: BertForQuestionAnswering's lean forward (on) or transformers' (off), BertModel lean in both.
qa-head-kernel: the lean QA forward runs qa_outputs as bsbert::head_logits (on) or calls the module (off).
chain-cache: a registered fused encoder keeps its middle layers' prepared row chains between calls
(on) or prepares every chain on every call (BSBERT_ENCODER_CHAIN_CACHE=0).
embeddings-op: the lean forward computes the embeddings with bsbert::bert_embeddings (on) or calls the
embeddings module (off).
"""
import argparse
import os

import torch

import bsbert
from bsbert import fast_layer, models
from bsbert.bench import _inputs
from bsbert.cli import non_negative_int, positive_int, seq_fits_or_usage_error
from bsbert.nn import DenseAddLayerNorm
from bsbert.timing import best_of_interleaved


# toggles whose outputs agree within rounding, not bit for bit: bsbert::head_logits sums in another order than
# qa_outputs' F.linear, and the off arms of the ALSO_OFF modes drop it too
APPROX = {"qa-head-kernel", "fast-layers", "fused-encoder", "lean-model"}
ENV_TOGGLES = {"row-split": ("BSBERT_BSR_SPLIT", "blocks"), "balanced-panels": ("BSBERT_BSR_PANELS", "aligned"),
               "encoder-chain": ("BSBERT_ENCODER_CHAIN", "0"), "chain-cache": ("BSBERT_ENCODER_CHAIN_CACHE", "0")}
# patch's keyword arguments per mode (default: patch's defaults)
PATCH_KWARGS = {"fused-tail": {"fused_encoder": False}}  # the fused encoder never takes the fused-tail switch
# what a mode's off arm turns off besides its own feature (those features need it; see the docstring)
ALSO_OFF = {"fast-layers": "fused encoder, lean BertModel and QA forwards",
            "fused-encoder": "lean BertModel and QA forwards (bert_embeddings, head_logits)",
            "lean-model": "lean QA forward (head_logits)"}


def toggles(model, what):
    if what in ENV_TOGGLES:
        var, off_value = ENV_TOGGLES[what]

        def set_env(on):
            if on:
                os.environ.pop(var, None)
            else:
                os.environ[var] = off_value
        return set_env, sum(1 for m in model.modules() if getattr(getattr(m, "choice", None), "backend", "") == "cpu-bsr")
    if what == "fused-encoder":
        from bsbert import fused_encoder

        enc = model.bert.encoder
        if not fused_encoder.installed(enc):
            raise SystemExit(f"fused encoder is off: {model.bsbert_plan.fused_encoder_reason}")
        return lambda on: (fused_encoder.attach if on else fused_encoder.detach)(enc), len(enc.layer)
    if what == "lean-model":
        from bsbert import lean_model

        if not lean_model.installed(model.bert):
            raise SystemExit(f"lean model forward is off: {model.bsbert_plan.lean_model_reason}")
        return lambda on: (lean_model.attach if on else lean_model.detach)(model.bert), 1
    if what == "embeddings-op":
        from bsbert import lean_model

        if not lean_model.installed(model.bert):
            raise SystemExit(f"lean model forward is off: {model.bsbert_plan.lean_model_reason}")
        op = lean_model._embeddings_op
        return lambda on: setattr(lean_model, "_embeddings_op", op if on else (lambda *a: None)), 1
    if what == "qa-head-kernel":
        from bsbert import lean_model

        fn = lean_model._head_logits
        return lambda on: setattr(lean_model, "_head_logits", fn if on else (lambda *a: None)), 1
    if what == "lean-head":
        from bsbert import lean_model

        if not lean_model.installed(model):
            raise SystemExit(f"{type(model).__name__} has no lean forward")
        return lambda on: (lean_model.attach if on else lean_model.detach)(model), 1
    if what == "huge-pages":
        from bsbert import hugepages

        vals = hugepages.packed_values([model])
        if not model.bsbert_plan.huge_page_bytes:
            raise SystemExit(f"packed weights are not in huge pages: {model.bsbert_plan.huge_pages_reason}")
        huge = [v.view(v.shape) for v in vals]  # the placed storages
        small = [v.clone() for v in vals]       # torch's allocator: 4 KiB pages

        def set_pages(on):
            with torch.inference_mode():
                for v, h, s in zip(vals, huge, small):
                    v.set_(h if on else s)
        return set_pages, len(vals)
    if what == "fast-layers":
        layers = model._bsbert_fast_layers
        return lambda on: fast_layer.attach(layers) if on else fast_layer.uninstall(layers), len(layers)
    # fused-tail
    from bsbert import fused_encoder

    enc = getattr(getattr(model, "bert", None), "encoder", None)
    if enc is not None and fused_encoder.installed(enc):
        raise SystemExit("fused-tail: the fused encoder is installed and runs its own kernels whatever this switch "
                         "says; patch with fused_encoder=False (as main does) to time the switch")
    mods = [m for m in model.modules() if isinstance(m, DenseAddLayerNorm) and m._gemm_fused() is not None]
    if not mods:
        raise SystemExit("fused-tail: no output projection runs the GEMM + add + LayerNorm kernel (none on cpu-bsr?)")

    def set_on(on):
        # off: an instance attribute hides the method, so DenseAddLayerNorm.forward sees no fused kernel and runs
        # the GEMM, then add_layer_norm; on: the class's method again
        for m in mods:
            if on:
                m.__dict__.pop("_gemm_fused", None)
            else:
                m.__dict__["_gemm_fused"] = lambda: None
    return set_on, len(mods)


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("what", choices=["fused-tail", "fast-layers", "fused-encoder", "lean-model", "embeddings-op", "lean-head", "huge-pages",
                                     "qa-head-kernel",
                                     *ENV_TOGGLES],
                    help="the switch; fused-tail runs without the fused encoder; the off arm also turns off: " +
                         "; ".join(f"{k}: {v}" for k, v in ALSO_OFF.items()))
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--rounds", type=positive_int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--paired", type=non_negative_int, default=0, metavar="N",
                    help="N forwards each, alternating off/on, medians and the median per-pair ratio")
    ap.add_argument("--block", type=positive_int, default=1, metavar="K",
                    help="with --paired: alternate blocks of K forwards (the first of each block untimed), so "
                         "that what one forward leaves in the caches for the next is the same setting's")
    args = ap.parse_args()
    model = models.seed_like_model().eval().to(getattr(torch, args.dtype))
    seq_fits_or_usage_error(ap, model, args.seq)
    inp = _inputs(1, args.seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=args.seq, progress=False, **PATCH_KWARGS.get(args.what, {}))
    set_on, count = toggles(model, args.what)
    with torch.inference_mode():
        set_on(False)
        off_out = model(**inp).start_logits
        set_on(True)
        on_out = model(**inp).start_logits
    if args.what in APPROX:  # summation order differs: the last bit may too
        assert torch.allclose(off_out.float(), on_out.float(), rtol=1e-2, atol=1e-2), "outputs differ"
    else:
        assert torch.equal(off_out, on_out), "outputs differ between off and on"

    def run(on):
        set_on(on)
        model(**inp)
    if args.paired:
        return _paired(run, args, count)
    t_off, t_on = best_of_interleaved([lambda: run(False), lambda: run(True)], rounds=args.rounds, target_s=0.15)
    set_on(True)
    print(f"{_label(args.what, count)}, seq {args.seq}, {args.dtype}, {torch.get_num_threads()} threads, best of "
          f"{args.rounds} rounds: off {t_off * 1e3:.2f} ms, on {t_on * 1e3:.2f} ms, "
          f"saved {(t_off - t_on) * 1e3:.2f} ms ({100 * (t_off - t_on) / t_off:.1f}%)")


def _label(what, count):
    """The result line's start: the switch and, where its off arm turns off more than itself, what."""
    extra = " without the fused encoder" if what == "fused-tail" else ""
    if what in ALSO_OFF:
        extra += f"; off also turns off the {ALSO_OFF[what]}"
    return f"{what} ({count} modules{extra})"


def _paired(run, args, count):
    import statistics
    import time

    times = {False: [], True: []}
    ratios = []
    with torch.inference_mode():
        for on in (False, True, False, True):  # warm-up
            run(on)
        timed = max(1, args.block - 1)  # forwards timed per block (1 without --block)
        for i in range(max(1, args.paired // timed)):
            pair = {}
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                if args.block > 1:
                    run(on)  # the switch's forward: caches as the other setting left them
                t = []
                for _ in range(timed):
                    t0 = time.perf_counter()
                    run(on)
                    t.append(time.perf_counter() - t0)
                times[on] += t
                pair[on] = statistics.median(t)
            ratios.append(pair[True] / pair[False])
    run(True)
    med = {on: statistics.median(t) * 1e3 for on, t in times.items()}
    print(f"{_label(args.what, count)}, seq {args.seq}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{len(times[True])} timed forwards each, alternating{f' in blocks of {args.block}' if args.block > 1 else ''}: median off {med[False]:.2f} ms, on {med[True]:.2f} ms; "
          f"median on/off per pair {100 * (statistics.median(ratios) - 1):+.2f}%")


if __name__ == "__main__":
    main()
