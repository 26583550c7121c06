"""`bsbert bench --sweep`: dense vs patched over batch x seq x dtype, latency, throughput, memory.

Each configuration times dense BERT-large and the patched pruned model in the same dtype, back to
back, and says which is faster. Memory: the bytes of weights each model computes with, and the peak
extra memory of one forward: CUDA max_memory_allocated; on CPU with ``memory=True`` (--memory) a
child-process RSS probe (bsbert.memprobe), else not measured ("-" in the table, null in the JSON). Where
a probe fails (a sandbox that refuses /proc/self/clear_refs, a timeout) the row's dense_/patched_peak_act_reason
says why, and so does a note under the table.
"""
from __future__ import annotations

import json
import os
import time

import torch
from rich.console import Console
from rich.table import Table

import bsbert
from bsbert import models
from bsbert.bench import DTYPES, MAX_REL_DIFF_OK, _device_name, _inputs, _max_rel_diff, prepare_out_dir
from bsbert.timing import threads_text
from bsbert.timing import time_fn


def weight_bytes(model) -> int:
    """Bytes of the tensors the model computes with (bsbert's packed tensors; not kept originals)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    from bsbert.nn import SparseLinear

    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            add(t)
        if isinstance(m, SparseLinear) and m.choice is not None:
            for k, t in m.choice.prepared.tensors.items():
                if k != "bsm":
                    add(t)
    return total


def peak_forward_mb(fn, device) -> float | None:
    """Peak extra device memory of one forward on CUDA (max_memory_allocated); None elsewhere (CPU
    peaks are measured in a child process by bsbert.memprobe, see run_sweep(memory=True))."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def run_sweep(batches=(1, 8, 32), seqs=(128, 384), dtypes=None, device="cpu", repeats=2, out_dir="bench-out",
              small=False, console=None, memory: bool = False, warmup_s: float = 1.0) -> dict:
    console = console or Console(stderr=True)
    # before the first configuration: an --out that cannot be written or a --seq past the models' position
    # table would otherwise end the sweep with a traceback, its measurements lost
    prepare_out_dir(out_dir)
    models.check_seq_len(models.bert_large_config().max_position_embeddings, seqs, "BERT-large")
    dev = torch.device(device)
    dtypes = dtypes or (["float32", "bfloat16"] + (["float16"] if dev.type == "cuda" else []))
    over = {"num_hidden_layers": 2} if small else {}
    rows = []
    configs = [(dt, b, s) for dt in dtypes for b in batches for s in seqs]
    console.log(f"sweep: {len(configs)} configurations on {_device_name(dev)}")
    for dt_name in dtypes:
        dt = DTYPES[dt_name]
        dense = models.dense_bert_large(dtype=dt, **over).to(dev)
        pruned = models.seed_like_model(dtype=dt, **over).to(dev)
        for b in batches:
            for s in seqs:
                inp = _inputs(b, s, dense.config.vocab_size, dev)
                console.log(f"{dt_name} batch {b} seq {s}: dense ...")
                t_dense = time_fn(lambda: dense(**inp), repeats=repeats, device=dev, warmup_s=warmup_s)["median_ms"]
                mem_dense = peak_forward_mb(lambda: dense(**inp), dev)
                console.log(f"{dt_name} batch {b} seq {s}: patched ...")
                with torch.inference_mode():
                    ref = pruned(**inp)  # the masked dense model: what the patched one must compute
                bsbert.patch(pruned, tokens=b * s, seq=s, progress=False, keep_original=True)
                t_pat = time_fn(lambda: pruned(**inp), repeats=repeats, device=dev, warmup_s=warmup_s)["median_ms"]
                with torch.inference_mode():
                    diff = _max_rel_diff(ref, pruned(**inp), inp)
                ok = diff <= MAX_REL_DIFF_OK.get(dt_name, 6e-2)  # (NaN fails too)
                if not ok:
                    console.log(f"[bold red]  OUTPUTS DIFFER from the masked dense model: max rel diff {diff:.2e}[/]")
                mem_pat = peak_forward_mb(lambda: pruned(**inp), dev)
                why_dense = why_pat = ""
                w_pat = weight_bytes(pruned)  # replaced originals are no longer in the module tree
                if memory and dev.type == "cpu":
                    from bsbert.memprobe import probe_with_reason

                    console.log(f"{dt_name} batch {b} seq {s}: peak activation memory (child processes) ...")
                    # the threads and backends timed above (the child patches with this plan)
                    nthreads = torch.get_num_threads()
                    mem_dense, why_dense = probe_with_reason("dense", b, s, dt_name, small=small, threads=nthreads)
                    mem_pat, why_pat = probe_with_reason("patched", b, s, dt_name, small=small, threads=nthreads,
                                                         plan=pruned.bsbert_plan)
                    for name, why in (("dense", why_dense), ("patched", why_pat)):
                        if why:
                            console.log(f"  {name} peak activation memory not measured: {why}")
                bsbert.unpatch(pruned)
                rows.append({
                    "dtype": dt_name, "batch": b, "seq": s, "dense_ms": t_dense, "patched_ms": t_pat,
                    "speedup": t_dense / t_pat, "dense_seq_per_s": 1e3 * b / t_dense,
                    "patched_seq_per_s": 1e3 * b / t_pat, "dense_weights_mb": weight_bytes(dense) / 2**20,
                    "patched_weights_mb": w_pat / 2**20, "dense_peak_act_mb": mem_dense,
                    "patched_peak_act_mb": mem_pat, "dense_faster": t_dense < t_pat,
                    "dense_peak_act_reason": why_dense, "patched_peak_act_reason": why_pat,
                    "max_rel_diff": diff if diff == diff and abs(diff) != float("inf") else None, "outputs_ok": ok})
                r = rows[-1]
                console.log(f"  dense {t_dense:.1f} ms, patched {t_pat:.1f} ms ({r['speedup']:.2f}x)"
                            + ("  <-- DENSE IS FASTER" if r["dense_faster"] else ""))
        # free both before the next dtype's models (an assignment, not `del`: pyflakes took the lambdas above
        # for uses of deleted names)
        dense = pruned = None
    res = {"device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "small": small, "rows": rows,
           "outputs_ok": all(r["outputs_ok"] for r in rows)}
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"sweep-{dev.type}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    res["json"] = base + ".json"
    try:
        _plot(res, base + ".png")
        res["png"] = base + ".png"
    except Exception as exc:
        console.log(f"plot skipped: {exc}")
    return res


def sweep_table(res) -> Table:
    t = Table(title=f"bsbert bench --sweep — {res['device_name']} ({res['device']}, {threads_text(res['threads'])})"
              + (" [small]" if res["small"] else ""), caption=_probe_notes(res["rows"]) or None, caption_justify="left")
    for c in ("dtype", "batch", "seq", "dense ms", "patched ms", "speedup", "dense seq/s", "patched seq/s",
              "weights MB d/p", "peak act MB d/p", "note"):
        t.add_column(c, justify="right")
    def peak(r) -> str:  # "-" where nothing was measured (n/m/n/m read as a fraction)
        d, p = r["dense_peak_act_mb"], r["patched_peak_act_mb"]
        if d is None and p is None:
            return "-"
        return "/".join("-" if v is None else f"{v:.0f}" for v in (d, p))

    for r in res["rows"]:
        t.add_row(r["dtype"], str(r["batch"]), str(r["seq"]), f"{r['dense_ms']:.1f}", f"{r['patched_ms']:.1f}",
                  f"{r['speedup']:.2f}x", f"{r['dense_seq_per_s']:.2f}", f"{r['patched_seq_per_s']:.2f}",
                  f"{r['dense_weights_mb']:.0f}/{r['patched_weights_mb']:.0f}",
                  peak(r),
                  "; ".join(n for n, on in (("OUTPUTS DIFFER", r.get("outputs_ok") is False),
                                             ("dense faster", r["dense_faster"])) if on))
    return t


def _probe_notes(rows) -> str:
    """Why a peak activation memory probe gave "-" (each distinct reason once, with a probe it hit): without
    it a failed probe looks like one that was never asked for."""
    where = {}
    for r in rows:
        for name in ("dense", "patched"):
            why = r.get(f"{name}_peak_act_reason")  # (JSON from before these fields: none)
            if why:
                where.setdefault(why, []).append(f"{name} {r['dtype']} b{r['batch']} s{r['seq']}")
    return "\n".join(f"peak act MB not measured for {cfgs[0]}" + (f" and {len(cfgs) - 1} more" if len(cfgs) > 1 else "")
                     + f": {why}" for why, cfgs in where.items())


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [f"{r['dtype'][:4]} b{r['batch']} s{r['seq']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["speedup"] for r in rows],
           color=["tab:red" if r["dense_faster"] else "tab:green" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup of patched over dense (same dtype)")
    ax.set_title(f"bsbert sweep — {res['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
