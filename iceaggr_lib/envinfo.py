"""Where a benchmark ran: hardware, software, numeric settings and a measured memory bandwidth.

``collect(device)`` returns a JSON-ready dict that the benchmark notebook writes as
``environment.json`` beside ``benchmark.csv``; every number in a report is read next to it.
``measure_copy_bandwidth(device)`` times a large device-to-device copy once (bytes read plus bytes
written over time), the ceiling the report's memory floor is drawn from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; anything else as torch.device understands it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None when there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:  # triton is absent from CPU builds of torch
        return None


def numeric_settings() -> dict:
    """Settings that change the numbers: tf32, matmul precision, threads, dynamo's recompile limit."""
    import torch._dynamo

    dyn = torch._dynamo.config
    limit = getattr(dyn, "recompile_limit", None)
    if limit is None:
        limit = getattr(dyn, "cache_size_limit", None)
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_num_threads": torch.get_num_threads(),
        "dynamo_recompile_limit": limit,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def measure_copy_bandwidth(device: str | torch.device, n_bytes: int | None = None, repeats: int | None = None) -> float:
    """Device memory bandwidth in bytes/s from a large tensor copy (bytes read + bytes written).

    On CUDA: a 1 GiB (default) device-to-device ``copy_`` timed with CUDA events, median of 10
    after two warm-ups; on the CPU: a 128 MiB copy timed with a host clock, median of 5.
    """
    device = torch.device(device)
    if n_bytes is None:
        n_bytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    if repeats is None:
        repeats = 10 if device.type == "cuda" else 5
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    times.sort()
    return 2.0 * src.numel() * src.element_size() / times[len(times) // 2]


def source_digest(root: str | Path | None = None) -> str:
    """A digest of ``iceaggr_lib``'s Python sources (sha256 of each file's path and bytes, in path order; 16 hex
    digits): which code a measurement ran. The lent GPU machine gets a copy of the tree without ``.git``, so a
    commit id is not at hand there; ``python -c "from iceaggr_lib import envinfo; print(envinfo.source_digest())"``
    at a commit gives the digest to compare."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    paths = sorted(root.rglob("*.py"))
    if not paths:
        raise FileNotFoundError(f"source_digest: no Python sources under {root}")
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def collect(device: str | torch.device = "auto", measure_bandwidth: bool = True, extra: dict | None = None) -> dict:
    """Everything a reader needs to place a benchmark number: machine, versions, settings, bandwidth."""
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    info = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version(),
        "iceaggr_lib_digest": source_digest(),
        "gpu_name": None,
        "gpu_memory_gib": None,
        "gpu_sm_count": None,
        "nvidia_driver": None,
        "settings": numeric_settings(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_name=props.name,
                    gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    gpu_sm_count=props.multi_processor_count, nvidia_driver=nvidia_driver_version())
    if measure_bandwidth:
        bw = measure_copy_bandwidth(device)
        info["copy_bandwidth_gbps"] = round(bw / 1e9, 1)
        info["copy_bandwidth_method"] = ("device-to-device copy_ of 1 GiB, CUDA events, median of 10, bytes read + written"
                                         if device.type == "cuda" else
                                         "host copy_ of 128 MiB, perf_counter, median of 5, bytes read + written")
    if extra:
        info.update(extra)
    return info


def write(path: str | Path, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return path
