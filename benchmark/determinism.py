"""Seeding and determinism settings, recorded with every run.

CPU runs are bitwise deterministic on one machine for a fixed thread count and fixed math-library ISA settings;
the thread count, ATen's CPU capability and oneDNN's ISA each change the numbers (measured: BENCHMARK.md,
"Reproducibility"), so `configure` records what a reader needs to tell why two machines differ. GPU runs use the
deterministic flags that exist and record them (some CUDA kernels have no deterministic variant, hence warn_only).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import random
import warnings
from pathlib import Path

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any hashable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random state a run may draw from (Python, NumPy, torch CPU and CUDA), as tensors and plain
    values so that a checkpoint holding it loads with `weights_only=True`."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                   has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(requested: str) -> torch.device:
    from benchmark.errors import UserError
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(requested)


EVAL_BATCH_SIZES = {"cpu": 512, "cuda": 2048}
"""Evaluation batch size per device type, fixed and recorded (`eval_batch_size` in metrics.json): on a GPU the
kernels, hence the float32 logits' last bits, may depend on the batch size; on the CPU 512 is what every stored
number so far was computed with."""


def eval_batch_size(device: torch.device | str) -> int:
    return EVAL_BATCH_SIZES.get(torch.device(device).type, 512)


def configure(device: torch.device, threads: int, fast: bool = False) -> dict:
    """Apply the determinism settings for this process and return them for metrics.json.

    `fast` (`bench run --fast`) on CUDA lets cuDNN benchmark and pick non-deterministic algorithms; on the CPU it
    changes nothing here (torch.compile, the other half of --fast, is applied to the model by the pipeline)."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = fast
        torch.use_deterministic_algorithms(not fast, warn_only=True)
        # adaptive pooling's CUDA backward has no deterministic kernel; recorded below instead of warned per step
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "deterministic_algorithms": not (fast and device.type == "cuda"),
        "deterministic_warn_only": device.type == "cuda",
        "cudnn_benchmark": fast and device.type == "cuda",
        "autocast": "bfloat16" if device.type == "cuda" else "none",
        "eval_batch_size": eval_batch_size(device),
        "fast": fast,
        "torch": torch.__version__,
        **cpu_environment(),
    }


ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that pin the instruction set of ATen's kernels, oneDNN (convolutions) and MKL (GEMMs)."""
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags oneDNN and ATen dispatch on (f32 kernels: AVX2 vs AVX-512; AMX/bf16 pick other kernels)."""


@functools.cache
def cpu_environment() -> dict:
    """The CPU facts that decide which kernels run, hence the floating-point summation order: CPU model, SIMD flags,
    cache sizes (oneDNN sizes its blocking by them), ATen's dispatch level and any ISA-pinning variables."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level}{'d' if kind == 'Data' else ''}={size}")
    return {
        "cpu_model": model,
        "cpu_flags": " ".join(f for f in SIMD_FLAGS if f in flags),
        "cpu_caches": " ".join(caches),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": " ".join(f"{name}={os.environ[name]}" for name in ISA_VARIABLES if os.environ.get(name)),
    }
