"""A description of the machine, recorded with every benchmark result."""

from __future__ import annotations

import os
import platform

import psutil
import torch


# the vector extensions that decide which CPU kernels are fast (bf16 products, int8 dot products)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def describe() -> dict:
    cpu, flags, named = platform.processor() or "", set(), False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not named:
                    cpu, named = line.split(":", 1)[1].strip(), True
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info = {
        "hostname_hash": hash(platform.node()) & 0xFFFF,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_isa": [f for f in ISA_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        info["llama_cpp_python"] = None
    return info
