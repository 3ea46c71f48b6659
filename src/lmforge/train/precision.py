"""Precision and speed: which dtype to train in, autocast, TF32, and model FLOPs utilization (MFU).

`dtype = "auto"` picks bf16 autocast where the hardware computes bf16 natively (CUDA GPUs with bf16,
CPUs with AVX512-BF16 or AMX) and fp32 elsewhere; `dtype = "float32"` forces fp32. Weights, optimizer
state and the loss stay fp32 either way (autocast only lowers the matmuls).

MFU = achieved model FLOPs / peak FLOPs of one device. Model FLOPs per token follow PaLM (appendix B)
and nanoGPT: 6·N for the matmuls of forward + backward (N counts the tied output matrix once; the
embedding lookup costs no FLOPs) plus 12·L·d·T for attention scores and values. The peak is the GPU's
datasheet dense bf16 figure on CUDA and, on CPU, a matmul peak measured once per process in the dtype
the run uses (a CPU's datasheet figure says little about a shared or throttled machine).

On Linux with glibc, training and evaluation first make malloc keep freed memory for reuse
(`keep_freed_memory`), as the jemalloc/tcmalloc that PyTorch's CPU launcher preloads do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.model import GPTConfig

log = logging.getLogger("lmforge")

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s per device.
# Matched in order against torch.cuda.get_device_name(), so the more specific names come first.
GPU_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), so bf16 matmuls are faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return True
    try:  # older builds without the helpers: read the kernel's flag list
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB free at its top stays
HEAP_GROWTH_BYTES = 64 << 20
MALLOC_OPT_OUT = "LMFORGE_SYSTEM_MALLOC"  # set to 1 to leave glibc's malloc as it is


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the heap for the next allocation; True when it was set.

    By default glibc hands every block over 128 KiB-32 MiB (a dynamic threshold) to the kernel with mmap and
    gives it back on free, and trims the heap's free top. A training step frees and reallocates the same
    activations, gradients and logits every step, so each step page-faults its way through fresh memory
    again: a 64 MiB copy took 4 ms warm and 20-35 ms fresh here, and a cpu-small training step ran about
    1.2x faster with the memory kept. The price is that a process keeps its peak heap until it exits.
    A no-op on other C libraries and operating systems, or when LMFORGE_SYSTEM_MALLOC=1."""
    if os.environ.get(MALLOC_OPT_OUT, "") not in ("", "0") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (M_MMAP_THRESHOLD, KEEP_FREED_BYTES),
        (M_TRIM_THRESHOLD, KEEP_FREED_BYTES),
        (M_TOP_PAD, HEAP_GROWTH_BYTES),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: explicit choices are honoured; `auto` is bf16 where the device computes it natively."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_autocast(model: torch.nn.Module, dtype: str):
    """`autocast` for running `model` at the precision a config names (auto / float32 / bfloat16) on its device."""
    device = next(model.parameters()).device
    return autocast(device, resolve_dtype(dtype, device))


def enable_tf32(device: torch.device) -> None:
    """Let fp32 matmuls use TF32 tensor cores on GPUs (about 8x faster, 10-bit mantissa: fine for training)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


# --------------------------------------------------------------------------- FLOPs and MFU


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs (forward + backward) per token: 6·N + 12·L·d·T."""
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.n_embd * cfg.block_size


@functools.cache
def measured_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Best square-matmul FLOP/s on this CPU with the current thread count (measured once per process).

    The operands come from a private generator: drawing from the global RNG would shift the dropout masks
    of a run resumed in a new process (which measures again) against the run it continues."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, generator=g)
    b = torch.randn(n, n, dtype=dtype, generator=g)
    a @ b  # warm up oneDNN / MKL kernels
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 / best


def gpu_datasheet_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAK:
        if key in name:
            return peak
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from) for MFU; (None, why) when unknown."""
    if device.type == "cuda":
        peak = gpu_datasheet_peak(device)
        name = torch.cuda.get_device_name(device)
        if peak is None:
            return None, f"no datasheet peak known for GPU '{name}'"
        return peak, f"{name} datasheet dense bf16 peak"
    if device.type == "cpu":
        peak = measured_matmul_peak(dtype)
        return peak, f"measured {str(dtype).removeprefix('torch.')} matmul peak, {torch.get_num_threads()} threads"
    return None, f"no peak known for device type '{device.type}'"


class MFUMeter:
    """Turns tokens/s of one device into model FLOPs utilization against a stated peak."""

    def __init__(self, cfg: GPTConfig, n_params: int, device: torch.device, dtype: torch.dtype, quiet: bool = False):
        self.flops_per_token = flops_per_token(cfg, n_params)
        self.output_layer_flops = 6.0 * cfg.vocab_size * cfg.n_embd  # per token, forward + backward
        self.peak, self.source = peak_flops(device, dtype)
        if quiet:  # e.g. torchrun ranks other than 0
            return
        if self.peak is None:
            log.info("MFU not reported: %s", self.source)
        else:
            log.info(
                "MFU against %.4g GFLOP/s (%s); %.3g FLOPs per token",
                self.peak / 1e9,
                self.source,
                self.flops_per_token,
            )

    def mfu(self, tokens_per_s: float, output_fraction: float = 1.0) -> float | None:
        """`output_fraction`: the share of positions whose output layer ran (fine-tuning computes logits
        at answer tokens only, so the FLOPs it skips do not count as work done)."""
        if self.peak is None:
            return None
        skipped = self.output_layer_flops * (1.0 - output_fraction)
        return tokens_per_s * (self.flops_per_token - skipped) / self.peak
