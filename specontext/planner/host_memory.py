"""How the host KV of offloaded layers is held, and the bytes that really takes.

Pure functions: the memory model (:mod:`.memory`) counts the host tier with them, and the
offloaded cache (kv/offload.py) names them when it has to fall back to another kind.
"""

from __future__ import annotations

import mmap

from ..errors import InputError

# How the host KV of offloaded layers can be held (kv/offload.py allocates it as one block):
#   pageable    ordinary memory (no GPU): its logical bytes;
#   registered  an ordinary mapping page-locked with cudaHostRegister: whole pages, nothing more;
#   pin_memory  torch's caching host allocator (``pin_memory=True``, or ``.to("cpu",
#               non_blocking=True)`` from a GPU): a power of two, see pinned_block_bytes.
HOST_MEMORY_KINDS = ("pageable", "registered", "pin_memory")
# What OffloadedKVCache uses on a discrete GPU: kv/offload.py's allocate_host registers one
# anonymous mapping with cudaHostRegister, so the plan counts exact bytes (whole pages). Only if
# CUDA refuses that does it fall back to pin_memory, with a warning that names the power of two it
# pins instead (up to twice the plan's host tier).
CUDA_HOST_MEMORY = "registered"


def check_host_memory(host_memory: str) -> None:
    """Raise InputError unless ``host_memory`` is one of HOST_MEMORY_KINDS."""
    if host_memory not in HOST_MEMORY_KINDS:
        raise InputError(f"host_memory must be one of {', '.join(HOST_MEMORY_KINDS)}; got {host_memory!r}")


def host_memory_for(device_kind: str) -> str:
    """How OffloadedKVCache holds its host KV on a device of ``device_kind`` (``cuda`` or ``cpu``)."""
    return CUDA_HOST_MEMORY if device_kind == "cuda" else "pageable"


def pinned_block_bytes(num_bytes: int, host_memory: str = "pin_memory") -> int:
    """Host bytes that one block of ``num_bytes`` really takes when held as ``host_memory``.

    ``pin_memory``: torch's caching host allocator (``CachingHostAllocatorImpl::allocate``) rounds
    every request up to the next power of two and pins that whole block, through cudaHostAlloc
    or, with ``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True``, through malloc and
    cudaHostRegister of the rounded size after touching each of its pages (spread over
    ``pinned_num_register_threads`` threads, which changes the time, not the size). Freed blocks
    stay cached, reusable only by requests of the same power of two. So 17 GiB pins 32 GiB.
    ``registered``: cudaHostRegister on an ordinary mapping of exactly ``num_bytes``: whole pages.
    ``pageable``: ``num_bytes``.

    Example: ``pinned_block_bytes(17 * 2**30) == 32 * 2**30``.
    """
    check_host_memory(host_memory)
    if num_bytes <= 0:
        return 0
    if host_memory == "pin_memory":
        return 1 << (num_bytes - 1).bit_length()
    if host_memory == "registered":
        return -(-num_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
    return num_bytes

