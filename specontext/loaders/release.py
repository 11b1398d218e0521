"""Give freed host memory back to the operating system while a model loads (glibc only).

Loading reads each GGUF tensor, converts it and frees the source: hundreds of MB of short-lived
buffers. glibc's malloc serves a large request from mmap only above a threshold that rises each
time such a buffer is freed, so after the first few tensors the rest come from the heap, and the
heap keeps what is freed: loading the default model with ``--weights int8`` peaked at 1,175 MB
resident and stayed at 1,028 MB, against 660 and 487 MB with the threshold held at 128 KiB (its
starting value). Held there for good, though, every large activation of a prefill chunk became a
fresh mmap and prefill ran at 0.31x its speed (int8 activations; fp32 0.69x); so :func:`returning_freed_memory` holds it
only while loading, then sets the highest values glibc's own rule would reach (a 32 MiB mmap
threshold and a 64 MiB trim threshold: activations come from a heap that is reused, the KV cache
and anything larger from mmap) and returns the heap's free memory. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
LOADING_THRESHOLD_BYTES = 128 * 1024
RUNNING_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@functools.lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc


@contextlib.contextmanager
def returning_freed_memory():
    """While the block runs, large buffers come from mmap and go back to the system when freed."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, RUNNING_THRESHOLD_BYTES)
        # what glibc's rule would set with it: a free top of the heap is kept up to twice that,
        # else every prefill chunk would give its buffers back and fault them in again
        libc.mallopt(M_TRIM_THRESHOLD, 2 * RUNNING_THRESHOLD_BYTES)
        libc.malloc_trim(0)
