"""Host memory for offloaded KV: page-locked for the copy engines where the device allows it.

How it is held (``OffloadedKVCache.host_memory`` says which was used): on CUDA the host KV is one
anonymous mapping page-locked with cudaHostRegister, so the pinned bytes equal its logical bytes.
Failing that it comes from torch's pinned allocator, which rounds every block up to a power of
two (17 GiB takes 32 GiB); failing that it falls back to pageable memory with a warning: the
copies then go through torch and block the host (no kernel can read pageable memory, and copies
from it are staged synchronously).

Host memory carries no ``record_stream`` mark for the native kernels, so it is released only
after a device synchronisation (the finalizers below).
"""

from __future__ import annotations

import math
import mmap
import warnings
from typing import Sequence

import torch

from ..planner.memory import pinned_block_bytes


def _synchronize(device: torch.device) -> None:
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:  # a failed CUDA context: nothing more runs on it
        pass



# How the host KV is held (``OffloadedKVCache.host_memory``):
#   "registered"  one anonymous mapping page-locked with cudaHostRegister: pinned bytes = logical
#                 bytes (rounded up to whole pages only);
#   "pin_memory"  torch's caching host allocator (``pin_memory=True``), which rounds each block up
#                 to a power of two: pinned bytes = 2 ** ceil(log2(logical bytes));
#   "pageable"    not pinned (no GPU, or pinning failed).
# The memory planner counts the pinned bytes from this; ``pinned_host_bytes`` is the one formula.
HOST_MEMORY_KINDS = ("registered", "pin_memory", "pageable")


def pinned_host_bytes(num_bytes: int, host_memory: str) -> int:
    """Page-locked bytes that holding ``num_bytes`` of host KV as ``host_memory`` takes (0 if pageable);
    the memory planner's ``pinned_block_bytes`` is the one formula."""
    return 0 if host_memory == "pageable" else pinned_block_bytes(num_bytes, host_memory)


def _release_registered(address: int, device: torch.device) -> None:
    """Unpin a registered range once no queued copy can touch it (its mapping is unmapped next)."""
    _synchronize(device)  # native kernels on any stream may still read or write it
    torch.cuda.cudart().cudaHostUnregister(address)  # a failure leaves nothing to undo


class _RegisteredPages(mmap.mmap):
    """An anonymous private mapping that unregisters itself from CUDA while it is still mapped.

    ``__del__`` runs before mmap's own deallocation unmaps the range (a ``weakref.finalize`` would
    run after it, on an unmapped range). Private anonymous memory can use transparent huge pages,
    which makes registering tens of GB much faster than 4 KiB pages of a shared mapping."""

    registered_on: torch.device | None = None
    address = 0

    def __del__(self):
        if self.registered_on is not None:
            device, self.registered_on = self.registered_on, None
            _release_registered(self.address, device)


def _registered_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed host memory page-locked with cudaHostRegister, for exactly the storage's lifetime.

    The bytes come from an anonymous mapping (page-aligned, zero-filled by the kernel, nothing
    rounded beyond the last page). ``torch.frombuffer`` keeps the mapping alive as long as the
    tensor's storage (views included); when the last view goes, the mapping synchronises the
    device and unregisters itself, then is unmapped.
    """
    num_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    pages = _RegisteredPages(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    address = flat.data_ptr()
    cudart = torch.cuda.cudart()
    # flags 0 (cudaHostRegisterDefault): with unified addressing the range is mapped and portable,
    # so the copy kernels read it through the same pointer, as they do pin_memory tensors
    status = cudart.cudaHostRegister(address, num_bytes, 0)
    if status != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister failed: {cudart.cudaGetErrorString(status)}")
    pages.address, pages.registered_on = address, device
    out = flat.view(dtype).view(tuple(shape))
    if not out.is_pinned():  # the copy kernels check this before reading host memory
        raise RuntimeError("cudaHostRegister succeeded but CUDA does not report the range as pinned")
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["unknown error"])[0]


def allocate_host(shape: Sequence[int], dtype: torch.dtype, pin: bool,
                  device: torch.device | str = "cuda") -> tuple[torch.Tensor, str]:
    """A zeroed host tensor; returns it and how it is held (one of :data:`HOST_MEMORY_KINDS`).

    With ``pin`` it is page-locked for ``device``: registered with cudaHostRegister (pinned bytes
    = logical bytes), else from ``pin_memory=True`` (rounded up to a power of two), else, with a
    :class:`RuntimeWarning` rather than failing the run, pageable.
    """
    if not pin:
        return torch.zeros(shape, dtype=dtype), "pageable"
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if size:
        try:
            return _registered_zeros(shape, dtype, torch.device(device)), "registered"
        except (RuntimeError, AssertionError, AttributeError) as exc:  # no CUDA runtime, or it refused
            warnings.warn(f"could not register {size / 2**20:.1f} MiB of host memory with CUDA for the offloaded KV "
                          f"({_first_line(exc)}); using torch's pinned allocator, which pins "
                          f"{pinned_host_bytes(size, 'pin_memory') / 2**20:.1f} MiB for it (a power of two)",
                          RuntimeWarning, stacklevel=3)
    try:
        return torch.zeros(shape, dtype=dtype, pin_memory=True), "pin_memory"
    except RuntimeError as exc:
        reason = _first_line(exc)
        warnings.warn(f"could not pin {size / 2**20:.1f} MiB of host memory for the offloaded KV ({reason}); "
                      f"using pageable memory, so host-device copies are synchronous and slower "
                      f"(raise the locked-memory limit, `ulimit -l`, to get pinned memory)",
                      RuntimeWarning, stacklevel=3)
        return torch.zeros(shape, dtype=dtype), "pageable"
