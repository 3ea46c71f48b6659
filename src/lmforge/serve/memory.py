"""Memory figures for the memory panel, and the "free memory" action (the seed's "Clean Memory")."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import psutil
import torch

from lmforge.model import GPT


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_stats(model: GPT) -> dict:
    params = sum(_tensor_bytes(p) for p in model.parameters())
    buffers = sum(_tensor_bytes(b) for b in model.buffers())
    cfg = model.cfg
    kv_bytes = 2 * cfg.n_layer * cfg.n_head * cfg.block_size * cfg.head_dim * model.tok_emb.weight.element_size()
    return {
        "parameters": model.num_parameters(),
        "bytes": params + buffers,
        "dtype": str(model.tok_emb.weight.dtype),
        "device": str(model.tok_emb.weight.device),
        "kv_cache_bytes_per_request": kv_bytes,
    }


def live_tensors() -> dict:
    """Count and size of the torch tensors the Python heap still references (weights included)."""
    from torch._subclasses.fake_tensor import FakeTensor  # torch.compile's shape-only tensors: no memory

    count = size = 0
    seen: set[int] = set()
    for obj in gc.get_objects():
        try:
            # type() rather than isinstance(): isinstance reads __class__, which wakes deprecated module proxies
            kind = type(obj)
            if issubclass(kind, torch.Tensor) and not issubclass(kind, FakeTensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                count += 1
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    size += storage.nbytes()
        except Exception:  # noqa: BLE001 - odd objects (weakrefs, proxies) in the heap are skipped
            continue
    return {"count": count, "bytes": size}


def memory_report(models: dict[str, GPT]) -> dict:
    proc = psutil.Process()
    mem = proc.memory_info()
    vm = psutil.virtual_memory()
    report = {
        "process": {"rss_bytes": mem.rss, "vms_bytes": mem.vms, "threads": proc.num_threads()},
        "system": {"total_bytes": vm.total, "available_bytes": vm.available, "percent_used": vm.percent},
        "python": {
            "allocated_blocks": sys.getallocatedblocks(),
            "gc_objects": len(gc.get_objects()),
            "gc_counts": list(gc.get_count()),
        },
        "torch": {"tensors": live_tensors(), "threads": torch.get_num_threads()},
        "models": {name: model_stats(m) for name, m in models.items()},
    }
    if torch.cuda.is_available():
        report["cuda"] = {
            "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(),
        }
    return report


def _malloc_trim() -> bool:
    """Ask glibc to hand freed heap pages back to the OS (otherwise RSS rarely shrinks)."""
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def free_memory() -> dict:
    """Garbage-collect, release allocator caches, and report how much RSS went back to the system."""
    before = psutil.Process().memory_info().rss
    collected = gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trimmed = _malloc_trim()
    after = psutil.Process().memory_info().rss
    return {
        "gc_collected": collected,
        "malloc_trim": trimmed,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "freed_bytes": max(0, before - after),
    }
