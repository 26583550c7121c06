"""Whether bsbert can run on a device here: one check shared by `bsbert.load` and the command line's
``--device``, so that both refuse the same devices in the same words before any model is built or read."""
from __future__ import annotations

import torch


def device_problem(device) -> tuple[torch.device | None, str | None]:
    """(the torch.device, None) when bsbert can run on ``device`` here; otherwise (the device or None, why not),
    the reason without a prefix (the caller names its argument: ``--device 'tpu'`` or ``load(device='tpu')``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:  # TypeError: not a string, int or torch.device (None, a list)
        return None, f"not a torch device ({exc})"
    if dev.type not in ("cpu", "cuda"):
        return dev, "bsbert runs on 'cpu' or 'cuda'"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return dev, (f"torch sees no CUDA GPU here (torch {torch.__version__}, CUDA build: "
                     f"{torch.version.cuda or 'no'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        return dev, f"there is no GPU {dev.index} here: torch sees {n} (cuda:0 to cuda:{n - 1})"
    return dev, None
