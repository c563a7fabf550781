"""Per-step values built on the host (Python lists) put on the engine's device without a stream
synchronize.

``torch.tensor(values, device="cuda")`` copies and then waits for everything queued on the
stream (the step's forward included) before it returns: each such call in a sampling step is a
round trip that keeps the host from running ahead of the device. :func:`device_values` builds
the tensor in pinned host memory and queues a ``non_blocking`` copy (the caching host
allocator keeps the pinned block until the copy is done). On a CPU it is ``torch.tensor``.
"""

from __future__ import annotations

from typing import Any

import torch


def device_values(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a number or a nested list) as a tensor on ``device``, of ``dtype`` (None:
    inferred as ``torch.tensor`` infers it); queued behind the device's work, never waiting
    for it."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
