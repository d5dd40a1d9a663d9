"""How much memory fusing one MLP takes, how much the device has free, and how many experts fit at once.

The working set of the k-means methods on one MLP of width ``D`` with ``p`` numbers per sub-MLP and ``k``
clusters is about ``D * p * 4 bytes * 6`` (the float32 sub-MLPs, their canonical form, the rows k-means
centres in place, its transients and allocator slack) plus ``D * k * 4 bytes * 3`` (distance matrices);
README states the same formula and benchmarks/fusion_memory.py measures it. Experts of one layer are
clustered in chunks small enough for the free memory; a site where even one expert does not fit is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

FLOAT32 = 4
SUB_MLP_COPIES = 6
DISTANCE_COPIES = 3
USABLE = 0.8  # of the free memory: the rest is left to the allocator, the OS and the model's other tensors


def working_bytes(width: int, row_length: int, clusters: int) -> int:
    """Estimated working memory of k-means fusion on one MLP (one expert)."""
    return width * row_length * FLOAT32 * SUB_MLP_COPIES + width * clusters * FLOAT32 * DISTANCE_COPIES


def available_bytes(device: torch.device | str) -> int:
    """Memory free for new tensors on ``device``: for CUDA, the driver's free memory plus what torch's
    cache holds unused; for the CPU, the kernel's MemAvailable, capped by the cgroup's limit when set."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free = _meminfo_available()
    limit = _cgroup_free()
    return min(free, limit) if limit is not None else free


def experts_per_chunk(width: int, row_length: int, clusters: int, experts: int, device: torch.device) -> int:
    """How many of a layer's experts to cluster at once so that their working set fits in free memory."""
    per_expert = working_bytes(width, row_length, clusters)
    return max(1, min(experts, int(USABLE * available_bytes(device)) // per_expert))


def check_fits(description: str, width: int, row_length: int, clusters: int, device: torch.device) -> None:
    """Refuse, before anything is changed, a site where one MLP's working set exceeds the free memory."""
    needed, free = working_bytes(width, row_length, clusters), available_bytes(device)
    if needed > free:
        raise UserError(
            f"not enough memory to fuse {description}: it needs about {needed / 2**30:.1f} GB of working "
            f"memory for one MLP ({width} sub-MLPs of {row_length} numbers, {clusters} clusters) and "
            f"{free / 2**30:.1f} GB is free on {device}; free memory, use a smaller width or another device"
        )


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown (not Linux): nothing is refused or chunked


CGROUP_FILES = (  # (limit, usage) under cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_free() -> int | None:
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # no limit set
                return None
            return int(limit) - int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
    return None
