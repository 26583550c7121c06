"""The plan: one description of a pruned encoder shared by analyze, patch, bench and report.

``analyze`` fills the structure (kept heads/neurons, folds, densities, FLOPs); ``patch`` fills, for
every remaining linear, the chosen format/backend and why. ``Plan.to_dict``/``from_dict`` make it
JSON-serialisable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LinearPlan:
    name: str                    # "qkv", "attn_out", "ffn_in", "ffn_out"
    dense_shape: tuple[int, int]  # (out, in) of the original (masked dense) linear(s)
    packed_shape: tuple[int, int]  # (out, in) after removing dead heads/neurons
    nonzero: int                 # non-zero weights
    block_density: float         # fraction of non-empty 32x32 blocks in the packed weight
    format: str | None = None    # "dense" | "bsr" (set by patch)
    block: int | None = None
    backend: str | None = None   # e.g. "cpu-bsr", "onednn-dense", "torch-dense" (set by patch)
    reason: str | None = None    # why this backend/format (set by patch)
    timings_ms: dict = field(default_factory=dict)  # what patch measured, per candidate (empty if not measured)
    nonempty_area: int | None = None  # weights inside non-empty 32x32 tiles, edge tiles clipped (None: older plan)

    @property
    def density(self) -> float:
        n, k = self.dense_shape
        return self.nonzero / max(1, n * k)

    def dense_macs(self) -> int:
        return self.dense_shape[0] * self.dense_shape[1]

    def packed_macs(self) -> int:
        return self.packed_shape[0] * self.packed_shape[1]

    def bsr_macs(self) -> int:
        if self.nonempty_area is not None:
            return self.nonempty_area
        return int(round(self.block_density * self.packed_macs()))  # (a plan saved before nonempty_area)


@dataclass
class LayerPlan:
    index: int
    num_heads: int
    head_dim: int
    kept_heads: list[int]
    folded_heads: list[int]      # dead heads whose constant V bias still reaches the output bias
    ffn_size: int
    kept_neurons: list[int]
    folded_neurons: int          # dead neurons whose constant GELU(bias) reaches the output bias
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    attention_backend: str | None = None  # set by patch
    attention_reason: str | None = None

    def attention_macs(self, seq: int, kept: bool) -> int:
        heads = len(self.kept_heads) if kept else self.num_heads
        return 2 * seq * seq * heads * self.head_dim  # QK^T and PV per sequence


@dataclass
class Plan:
    family: str
    encoder_path: str
    hidden_size: int
    layers: list[LayerPlan]
    dtype: str = "float32"
    device: str | None = None     # set by patch
    unpad: bool = False           # padding-free encoder forward (set by patch)
    fast_layers: bool = False     # bsbert's lean layer forward (bsbert.fast_layer; set by patch)
    fast_layers_reason: str = ""  # why it is off when it was asked for
    fused_encoder: bool = False   # the whole encoder as one op (bsbert.fused_encoder; set by patch)
    fused_encoder_reason: str = ""  # why it is off
    lean_model: bool = False      # BertModel's lean forward (bsbert.lean_model; set by patch)
    lean_model_reason: str = ""
    huge_page_bytes: int = 0      # packed CPU weights moved to 2 MiB pages (bsbert.hugepages; set by patch)
    huge_pages_reason: str = ""   # why none were
    # patch's model-level check of the measured choices against SDPA attention and dense linears
    # (bsbert.model_check): {"checked": bool, "reason": str, and when checked "times_ms" (per variant),
    # "kept" (chosen / sdpa / dense / dense+sdpa), "chosen_ms", "dense_ms", "shape"}
    model_check: dict = field(default_factory=dict)

    # ---- FLOPs (2 per multiply-add), one sequence of length seq ---------------------------------
    def flops(self, seq: int, which: str = "remaining") -> float:
        """which: 'dense' (original), 'packed' (dead heads/neurons removed), 'remaining' (also skips
        zero 32x32 blocks of the packed weights)."""
        total = 0
        for lp in self.layers:
            for lin in lp.linears.values():
                macs = {"dense": lin.dense_macs(), "packed": lin.packed_macs(),
                        "remaining": lin.bsr_macs()}[which]
                total += 2 * seq * macs
            total += 2 * lp.attention_macs(seq, kept=(which != "dense"))
        return float(total)

    def speedup_bound(self, seq: int, which: str = "remaining") -> float | None:
        """Dense FLOPs over ``which`` FLOPs; None when nothing is left to compute (every head and neuron pruned:
        a ratio over zero FLOPs is no bound, and it used to print as 201326592x)."""
        left = self.flops(seq, which)
        return self.flops(seq, "dense") / left if left > 0 else None

    def summary(self) -> dict:
        heads = sum(len(l.kept_heads) for l in self.layers)
        total_heads = sum(l.num_heads for l in self.layers)
        nz = sum(lin.nonzero for l in self.layers for lin in l.linears.values())
        dense = sum(lin.dense_macs() for l in self.layers for lin in l.linears.values())
        return {
            "layers": len(self.layers), "kept_heads": heads, "total_heads": total_heads,
            "kept_neurons": sum(len(l.kept_neurons) for l in self.layers),
            "total_neurons": sum(l.ffn_size for l in self.layers),
            "linear_nonzero": nz, "linear_total": dense, "linear_density": nz / max(1, dense),
            "bound_seq128": self.speedup_bound(128), "bound_seq384": self.speedup_bound(384),
            "packing_bound_seq384": self.speedup_bound(384, "packed"),
        }

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        layers = []
        for ld in d["layers"]:
            lins = {k: LinearPlan(**{**v, "dense_shape": tuple(v["dense_shape"]),
                                     "packed_shape": tuple(v["packed_shape"])})
                    for k, v in ld["linears"].items()}
            layers.append(LayerPlan(**{**ld, "linears": lins}))
        return cls(family=d["family"], encoder_path=d["encoder_path"], hidden_size=d["hidden_size"],
                   layers=layers, dtype=d.get("dtype", "float32"), device=d.get("device"),
                   unpad=d.get("unpad", False), fast_layers=d.get("fast_layers", False),
                   fast_layers_reason=d.get("fast_layers_reason", ""),
                   fused_encoder=d.get("fused_encoder", False),
                   fused_encoder_reason=d.get("fused_encoder_reason", ""),
                   lean_model=d.get("lean_model", False), lean_model_reason=d.get("lean_model_reason", ""),
                   huge_page_bytes=d.get("huge_page_bytes", 0), huge_pages_reason=d.get("huge_pages_reason", ""),
                   model_check=d.get("model_check", {}))

    # ---- report -----------------------------------------------------------------------------------
    def table(self, seq: int = 384) -> str:
        head = (f"{'layer':>5} {'heads':>7} {'neurons':>9} "
                f"{'qkv dens/blk':>13} {'out dens/blk':>13} {'ffn_in dens':>11} {'ffn_out dens':>12} "
                f"{'attention':<10} {'backends (qkv/out/in/out)':<40}")
        lines = [head, "-" * len(head)]
        for lp in self.layers:
            L = lp.linears

            def db(name):
                lin = L.get(name)
                return f"{lin.density:.2f}/{lin.block_density:.2f}" if lin else "-"

            def dens(name):
                lin = L.get(name)
                return f"{lin.density:.3f}" if lin else "-"

            def be(name):
                lin = L.get(name)
                if lin is None or lin.backend is None:
                    return "-"
                return f"{lin.backend}" + (f"@{lin.block}" if lin.format == "bsr" else "")

            backends = "/".join(be(n) for n in ("qkv", "attn_out", "ffn_in", "ffn_out"))
            attn = (lp.attention_backend if lp.kept_heads else None) or "-"  # none runs without kept heads
            lines.append(
                f"{lp.index:>5} {len(lp.kept_heads):>3}/{lp.num_heads:<3} "
                f"{len(lp.kept_neurons):>4}/{lp.ffn_size:<4} {db('qkv'):>13} {db('attn_out'):>13} "
                f"{dens('ffn_in'):>11} {dens('ffn_out'):>12} {attn:<10} {backends:<40}")
        s = self.summary()
        lines.append("-" * len(head))
        lines.append(
            f"heads {s['kept_heads']}/{s['total_heads']}, FFN neurons {s['kept_neurons']}/"
            f"{s['total_neurons']}, linear weights non-zero {_num(s['linear_nonzero'] / 1e6)}M of "
            f"{_num(s['linear_total'] / 1e6)}M ({100 * s['linear_density']:.1f}%)")
        lines.append(
            f"FLOPs at seq {seq}: dense {_num(self.flops(seq, 'dense') / 1e9)} G, packed "
            f"{_num(self.flops(seq, 'packed') / 1e9)} G, remaining (skipping zero blocks) "
            f"{_num(self.flops(seq, 'remaining') / 1e9)} G -> " + _bound_text(self, seq))
        if self.device is not None:  # patched: how the layers run
            how = ("bsbert's lean layer forward" if self.fast_layers else
                   "transformers' layer forward" + (f" ({self.fast_layers_reason})" if self.fast_layers_reason else ""))
            lines.append(f"layer forward: {how}{', padding-free encoder' if self.unpad else ''}")
            lines.append("encoder: " + ("one C++ op for all layers (bsbert::bert_encoder)" if self.fused_encoder
                                        else f"layer by layer ({self.fused_encoder_reason or 'fused encoder off'})")
                         + ("; BertModel: bsbert's lean forward for plain calls" if self.lean_model else ""))
            if self.device.startswith("cpu"):
                lines.append("packed CPU weights: " + (f"{self.huge_page_bytes / 1e6:.1f} MB in 2 MiB pages"
                                                       if self.huge_page_bytes else
                                                       f"4 KiB pages ({self.huge_pages_reason or 'none placed'})"))
            if self.model_check:
                lines.append("model check: " + self.model_check.get("reason", ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _num(v: float) -> str:
    """One decimal from 1 up, three significant digits below: a small model printed every FLOP count as 0.0 G."""
    return f"{v:.1f}" if v >= 1 or v == 0 else f"{v:.3g}"


def _bound_text(plan: Plan, seq: int) -> str:
    bound = plan.speedup_bound(seq)
    if bound is None:  # (then none for packing either: the packed FLOPs are at least the remaining ones)
        return "no speedup bound (no encoder linear or attention FLOPs left)"
    return f"speedup bound {bound:.2f}x (packing only {plan.speedup_bound(seq, 'packed'):.2f}x)"
