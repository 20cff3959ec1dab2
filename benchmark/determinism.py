"""Seeding and determinism settings, recorded with every run.

CPU runs are bitwise deterministic for a fixed thread count; GPU runs use the deterministic flags that exist
and record them (some CUDA kernels have no deterministic variant, hence warn_only there).
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings

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


def resolve_device(requested: str) -> torch.device:
    from benchmark.errors import UserError
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(requested)


def configure(device: torch.device, threads: int) -> dict:
    """Apply the determinism settings for this process and return them for metrics.json."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
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
        "deterministic_algorithms": True,
        "deterministic_warn_only": device.type == "cuda",
        "cudnn_benchmark": False,
        "autocast": "bfloat16" if device.type == "cuda" else "none",
        "torch": torch.__version__,
    }
