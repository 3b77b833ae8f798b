"""How much memory this machine has: the preflight of absurd sizes (issue 27, class 8).

A recipe with ``backbone.embed_dim=1048576`` or an image folder of millions of big images
should be refused in one line before anything is allocated or decoded, not after minutes of
work when the allocator asks the kernel for terabytes. The estimates this is compared with are
lower bounds (see their callers), so a refusal means "cannot fit", never "might be tight".
"""

from __future__ import annotations

import os


def cpu_memory() -> int:
    """Bytes of memory available to a new allocation here (``MemAvailable``; the physical
    total where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: str) -> tuple[int, str]:
    """Bytes of memory of the device a run trains on, and its name for messages."""
    if device in ("auto", "cuda") or device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            props = torch.cuda.get_device_properties(index)
            return int(props.total_memory), f"the GPU's {props.total_memory / 2**30:.0f} GiB"
    free = cpu_memory()
    return free, f"the {free / 2**30:.1f} GiB of free CPU memory"


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"
