"""Packed CPU weights in 2 MiB pages (Linux transparent huge pages, ``madvise`` mode or ``always``).

Why: a patched BERT-large streams all its packed weights from DRAM once per forward (~160 MB in bf16,
five times the L3 here), 4 KiB page after 4 KiB page (likely a TLB miss every few block rows that the
weight prefetches then wait on). Measured on the 2-core Zen 5, bf16 at seq 128 (where a weight byte
serves the fewest FLOPs): ``bsbert::bert_encoder`` with the same tensors in 2 MiB vs 4 KiB pages +0.7 to
+3.9% over five interleaved runs, the whole model (``scripts/model_ab.py huge-pages``) +0.7, -2.1, +2.0,
+1.9%; fp32 at seq 128 and bf16 at seq 384 within noise. Small, but free per call. torch's CPU allocator
gives 4 KiB pages unless ``THP_MEM_ALLOC_ENABLE=1`` was set before it started, and then only to
allocations of 2 MiB and more.

How: :func:`place` moves a tensor's data into an arena of anonymous mmaps (64 MiB chunks, 2 MiB aligned,
advised ``MADV_HUGEPAGE``) *in place* (``Tensor.set_``), so every closure and fused-encoder program
holding the tensor object keeps working, bit for bit. A chunk is unmapped when the last tensor in it
dies (``torch.frombuffer`` keeps the mmap alive); each ``patch`` seals its last chunk, so deleting a model
frees its weights. ``patch`` places the block-sparse CPU kernel's packed
weights (:func:`place_packed_weights`); ``BSBERT_HUGEPAGES=0`` (or false/no/off) turns that off, and it
is off where ``madvise`` or transparent huge pages are unavailable (the plan says why). The arena is
shared by every patch in a process and takes a lock, so threads may patch (or :func:`place`) at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
import threading
import warnings

import torch

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE = 2 << 20
CHUNK = 64 << 20
ALIGN = 64  # a tensor starts on a cache line


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


@functools.lru_cache(maxsize=None)
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


# BSBERT_HUGEPAGES spellings (stripped, any case); anything else is warned about and leaves the default (on)
OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")
_warned = set()  # the unrecognised values already warned about (one warning per value, not per patch)


def _switched_off() -> str | None:
    """"BSBERT_HUGEPAGES=<value>" when that variable turns huge pages off, else None. A value that is
    neither in OFF nor in ON (a typo, "disable") would otherwise change nothing without a word."""
    raw = os.environ.get("BSBERT_HUGEPAGES")
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in OFF:
        return f"BSBERT_HUGEPAGES={raw.strip()}"
    if value not in ON and raw not in _warned:
        _warned.add(raw)
        warnings.warn(f"BSBERT_HUGEPAGES={raw!r} is not one of {', '.join(OFF)} (off) or {', '.join(ON)} (on): "
                      "ignored, packed weights go to huge pages where available", RuntimeWarning, stacklevel=3)
    return None


def unavailable_reason() -> str | None:
    """None if packed weights can go to huge pages here, else why not."""
    off = _switched_off()
    if off:
        return off
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature (platform {sys.platform})"
    mode = thp_mode()
    if mode is None:
        return "no /sys/kernel/mm/transparent_hugepage/enabled (kernel without transparent huge pages)"
    if mode == "never":
        return "transparent huge pages are disabled (transparent_hugepage/enabled = never)"
    try:
        _madvise()
    except (OSError, AttributeError) as exc:
        return f"madvise unavailable ({exc})"
    return None


class Arena:
    """Bump allocator over 2 MiB-aligned anonymous mmaps advised MADV_HUGEPAGE. Thread-safe: without the
    lock, two threads placing at once read the same ``_used`` and got overlapping spans (one tensor's
    values overwritten by another's)."""

    def __init__(self, chunk_bytes: int = CHUNK):
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()  # guards _chunk, _used and _bases
        self._chunk = None  # uint8 tensor over the current mmap's aligned part
        self._used = 0
        self._bases = set()  # storage addresses of every chunk made (an int each; for owns())

    def _new_chunk(self, need: int) -> None:  # (called with _lock held)
        size = max(self.chunk_bytes, -(-need // HUGE) * HUGE)
        buf = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        addr = ctypes.addressof(view)
        del view  # a live ctypes export would pin the buffer for no reason
        skip = (-addr) % HUGE
        if _madvise()(addr + skip, size, MADV_HUGEPAGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "madvise(MADV_HUGEPAGE) failed" + (f": {os.strerror(err)}" if err else ""))
        with torch.inference_mode(False):  # a normal tensor: placed tensors may be either kind
            self._chunk = torch.frombuffer(buf, dtype=torch.uint8)[skip:skip + size]
        self._used = 0
        self._bases.add(self._chunk.untyped_storage().data_ptr())

    def alloc(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` uint8 in huge-page memory, ALIGN-aligned (contents undefined)."""
        with self._lock:
            start = -(-self._used // ALIGN) * ALIGN
            if self._chunk is None or start + nbytes > self._chunk.numel():
                self._new_chunk(nbytes)
                start = 0
            self._used = start + nbytes
            with torch.inference_mode(False):
                return self._chunk[start:start + nbytes]

    def seal(self) -> None:
        """Start the next allocation in a new chunk: the arena no longer holds the current one, which is
        then unmapped with its last tensor (an untouched tail of it was never resident)."""
        with self._lock:
            self._chunk = None

    def owns(self, t: torch.Tensor) -> bool:
        """t's storage is one of this arena's chunks (an address of a chunk since unmapped and reused
        could match: then a tensor is merely left where it is)."""
        ptr = t.untyped_storage().data_ptr()
        with self._lock:
            return ptr in self._bases


_arena = Arena()


def place(t: torch.Tensor, arena: Arena | None = None) -> bool:
    """Move ``t``'s data into huge-page memory in place (same tensor object, values, shape, dtype).
    False (t unchanged) for tensors it does not handle: not on the CPU, not contiguous, empty, or
    already there."""
    arena = arena or _arena
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or t.requires_grad or arena.owns(t):
        return False
    nbytes = t.numel() * t.element_size()
    with torch.inference_mode(False):
        dst = arena.alloc(nbytes).view(t.dtype).view(t.shape)
    with torch.inference_mode(t.is_inference()):  # set_ on an inference tensor needs inference mode
        dst.copy_(t)
        t.set_(dst)
    return True


def packed_values(modules) -> list[torch.Tensor]:
    """The packed values of every ``cpu-bsr`` linear among ``modules`` (and their children), each once."""
    out, seen = [], set()
    for root in modules:
        for m in root.modules():
            choice = getattr(m, "choice", None)
            if choice is None or choice.backend != "cpu-bsr":
                continue
            values = choice.prepared.tensors.get("values")
            if values is not None and id(values) not in seen:
                seen.add(id(values))
                out.append(values)
    return out


def place_packed_weights(modules) -> tuple[int, str]:
    """Place :func:`packed_values` of ``modules``; returns (bytes placed, why none were placed or "")."""
    why = unavailable_reason()
    if why:
        return 0, why
    placed = 0
    for values in packed_values(modules):
        try:
            if place(values):
                placed += values.numel() * values.element_size()
        except (OSError, RuntimeError) as exc:  # no memory for a mapping, an odd tensor: stay in 4 KiB pages
            _arena.seal()
            return placed, f"stopped after {placed} bytes: {exc}"
    _arena.seal()  # this model's weights alone keep its chunks alive
    return placed, "" if placed else "no block-sparse CPU weights to place"
