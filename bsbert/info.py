"""`python -m bsbert.info`: versions, and which backends are usable here (and why not)."""
from __future__ import annotations

import os
import platform

import torch


def _cuda_kernels(mod) -> str:
    from bsbert import _ext

    if not mod.with_cuda():
        return "no"
    return ("yes, with the Hopper wgmma kernels (sm_90a)" if _ext.has_sm90a()
            else "yes, without sm_90a (no wgmma kernels)")


def _cpu_peak() -> str:
    """The CPU's multiply-add issue rate on torch's threads (a 0.05 s probe per dtype), what the GEMMs'
    GFLOP/s are shares of."""
    from bsbert import _ext
    from bsbert.timing import cpu_peak_gflops, threads_text

    parts = []
    if _ext.bf16_widened_on_cpu():  # said instead of timing the fp32 loop twice: a float32 model may be faster
        parts.append("bf16 widened to fp32 (no bf16 dot product at this CPU level: bsbert's bf16 GEMMs run fp32 "
                     "FMAs, a float32 model may be faster)")
    for dtype in (torch.float32,) if parts else (torch.bfloat16, torch.float32):
        r = cpu_peak_gflops(dtype, seconds=0.05)
        if r is not None:
            parts.append(f"{r['kind']} {r['gflops']:.0f} GFLOP/s ({r['instruction']}, {threads_text(r['threads'])})")
    return "; ".join(parts) or f"not measurable here ({_why_no_peak()})"


def _cpu_few_rows(mod) -> str:
    """Which kernel the CPU block-sparse GEMM runs for one to three rows (a token or three) at this level."""
    if mod is None:
        return "no extension"
    if not hasattr(mod, "cpu_bsr_gemv_rows"):
        return "the register tiles (this build has no GEMV kernel)"
    rows = mod.cpu_bsr_gemv_rows(False)
    if rows:
        return f"M <= {rows} rows on the GEMV kernel at {mod.cpu_isa()} (BSBERT_BSR_GEMV=0: the register tiles)"
    switch = os.environ.get("BSBERT_BSR_GEMV")
    if switch is not None:
        return f"the register tiles at {mod.cpu_isa()}: the GEMV kernel is switched off (BSBERT_BSR_GEMV={switch})"
    return (f"the register tiles at {mod.cpu_isa()}: the GEMV kernel for one to three rows is off at this level "
            "(not timed here yet; BSBERT_BSR_GEMV=1 turns it on)")


def _why_no_peak() -> str:
    """Why the instruction peak probe has nothing to time: no extension, a cap (BSBERT_CPU_ISA=portable on a
    CPU with AVX2 would otherwise read as a CPU without it), or a CPU without AVX2 / AVX-512."""
    from bsbert import _ext

    mod = _ext.load(warn=False)
    if mod is None:
        return "no extension"
    if not hasattr(mod, "cpu_peak_gflops"):
        return "this build of the extension has no peak probe"
    if _runs_emulated(mod):
        return "an emulated AVX-512 test build (BSBERT_EMULATE_AVX512): no native instruction to time"
    cap = os.environ.get("BSBERT_CPU_ISA")
    if mod.cpu_isa() == "portable" and cap is not None and (own := _uncapped_isa(mod)) != "portable":
        return f"capped by BSBERT_CPU_ISA={cap}: no SIMD multiply-add to time below AVX2; this CPU has {own}"
    return "no AVX2/AVX-512 at this CPU level"


def _uncapped_isa(mod) -> str:
    """The CPU's own level: the kernels read BSBERT_CPU_ISA on every call (csrc/cpu/isa.cpp), so asking
    with the variable unset for a moment gives the level without the cap (info is single-threaded)."""
    cap = os.environ.pop("BSBERT_CPU_ISA", None)
    try:
        return mod.cpu_isa()
    finally:
        if cap is not None:
            os.environ["BSBERT_CPU_ISA"] = cap


def _engines() -> str:
    """Other inference engines `bsbert bench --engines` can time on the packed model, or why not."""
    from bsbert.engines import ENGINES, why_unavailable

    parts = []
    for name in ENGINES:
        why = why_unavailable(name)
        parts.append(f"{name}: " + (why or f"yes ({_version(name)})"))
    return "; ".join(parts)


def _version(module: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(module)
    except Exception:
        return "version unknown"


def _isa_cap_note(effective: str) -> str:
    """What BSBERT_CPU_ISA did: the kernels (csrc/cpu/isa.cpp) silently ignore a value that is not one of
    ISA_LEVELS exactly (a typo, "AVX2") and one above the CPU's own level; said here, since the ISA shown
    alone would not tell a user that the cap they set is not in effect."""
    from bsbert._ext import ISA_LEVELS, unknown_isa_cap

    cap = os.environ.get("BSBERT_CPU_ISA")
    if cap is None:
        return ""
    if unknown_isa_cap() is not None:
        return f"; BSBERT_CPU_ISA={cap!r} is not one of {', '.join(ISA_LEVELS)}: ignored"
    if cap != effective:
        return f"; BSBERT_CPU_ISA={cap} is above this CPU's level: no effect"
    return f", capped by BSBERT_CPU_ISA={cap}"


def _runs_emulated(mod) -> bool:
    """The CPU kernels run emulated now: an emulated AVX-512 test build at an AVX-512 level (capped to avx2 or
    portable, that build runs native code)."""
    from bsbert import _ext

    return _ext.isa_emulated() and mod.cpu_isa().startswith("avx512")


_EMULATED_NOTE = " (EMULATED by SIMDe: a test build, slow; rebuild without BSBERT_EMULATE_AVX512 for use)"


def collect() -> dict:
    from bsbert import _ext
    from bsbert.ops.linear_backends import BACKENDS

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not available ({type(exc).__name__})"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = "not installed"
    mod = _ext.load(warn=False)
    info["extension"] = ("loaded (built for torch %s, CUDA kernels %s, CPU ISA %s%s)" % (
        mod.torch_version(), _cuda_kernels(mod), mod.cpu_isa() + _EMULATED_NOTE * _runs_emulated(mod),
        _isa_cap_note(mod.cpu_isa()))) if mod else \
        f"unavailable: {_ext.reason_unavailable()}"
    # which compiled ops have a kernel for which device (the fused encoder, bert_encoder, is CPU only)
    ops = ("bsr_linear", "bsr_linear_add_layer_norm", "add_layer_norm", "pruned_attention",
           "pruned_attention_varlen", "bert_encoder", "bert_encoder_registered", "bert_embeddings", "head_logits")
    for key in ("CPU", "CUDA"):
        have = []
        for op in ops:
            try:
                if mod and torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbert::{op}", key):
                    have.append(op)
            except RuntimeError:  # the op is not defined in this build
                pass
        info[f"{key.lower()}_ops"] = ", ".join(have) or "none"
    info["cpu_peak"] = _cpu_peak()
    info["cpu_few_rows"] = _cpu_few_rows(mod)
    info["engines"] = _engines()
    info["huge_pages"] = _huge_pages()
    info["backends"] = _reasons(BACKENDS, lambda be: 32 if be.format == "bsr" else None)
    # the attention kernels patch chooses among (patch(attention=...)), at BERT's head size 64
    from bsbert.ops.attention_backends import ATTENTION_BACKENDS

    info["attention_backends"] = _reasons(ATTENTION_BACKENDS, lambda be: ATTENTION_HEAD_DIM)
    # usable there, but patch runs them only when forced (never measured against the others)
    info["attention_forced_only"] = {
        f"{dev}/{name}": why for dev in _devices() for name, be in ATTENTION_BACKENDS.items()
        if (why := be.forced_only_reason(torch.device(dev)))}
    return info


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reasons(backends: dict, arg) -> dict:
    """"device/dtype/name" -> why backend ``name`` cannot run there (empty: it can), for every device here
    and dtype; ``arg(backend)``: the third argument of its not_supported_reasons (block / head_dim)."""
    out = {}
    for dev in _devices():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for name, be in backends.items():
                out[f"{dev}/{str(dtype).replace('torch.', '')}/{name}"] = be.not_supported_reasons(
                    torch.device(dev), dtype, arg(be))
    return out


ATTENTION_HEAD_DIM = 64  # BERT-base/large's head size: what the attention rows are checked at


def _huge_pages() -> str:
    """Whether patch can put the CPU kernel's packed weights in 2 MiB pages here (bsbert.hugepages): only
    the block-sparse CPU kernel (cpu-bsr) has packed weights, so without it there is nothing to place."""
    from bsbert import hugepages
    from bsbert.ops.linear_backends import BACKENDS

    kernel = BACKENDS["cpu-bsr"].not_supported_reasons(torch.device("cpu"), torch.float32, 32)
    if kernel:
        return f"no: the block-sparse CPU kernel is unavailable ({'; '.join(kernel)})"
    why = hugepages.unavailable_reason()
    return (f"yes (transparent huge pages: {hugepages.thp_mode()}; BSBERT_HUGEPAGES=0 turns them off)"
            if why is None else f"no: {why}")


_TABLES = {"backends": "linear backends (device/dtype/backend: usable, or why not):",
           "attention_backends": f"attention backends (device/dtype/backend, head_dim {ATTENTION_HEAD_DIM}: "
                                 "usable, or why not):"}


def main():
    info = collect()
    forced_only = info["attention_forced_only"]
    for k, v in info.items():
        if k not in _TABLES and k != "attention_forced_only":
            print(f"{k:>15}: {v}")
    for key, title in _TABLES.items():
        print(title)
        for k, reasons in info[key].items():
            dev, _, name = k.split("/")
            only = forced_only.get(f"{dev}/{name}") if key == "attention_backends" else None
            usable = f"only when forced: {only}" if only else "yes"
            print(f"  {k:<32} {usable if not reasons else 'no: ' + '; '.join(reasons)}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `python -m bsbert.info | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # (Python's own advice: stdout's final flush fails too)
        raise SystemExit(0)
