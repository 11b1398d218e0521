"""Thin wrappers over the native row copies, each checked before its pointers reach C, and
their pure-torch float32 references.

Shape letters: N rows of the indexed buffer, M selected rows (``len(indices)``), ``*R`` the row
shape (any trailing dims; each row must be contiguous, while rows may be strided along dim 0,
e.g. a slice of a larger buffer), P planes (e.g. a layer's K and V, copied with the same row
indices).

Every wrapper checks device, dtype, contiguity and shape (ValueError naming what is expected),
passes ``data_ptr()`` and the current CUDA stream, and turns a bad status into
:class:`~.library.NativeError`.
"""

from __future__ import annotations

import math

import torch

from .library import NativeLibrary, library, raise_for


def _row_layout(name: str, t: torch.Tensor, row_dim: int = 0) -> tuple[int, int]:
    """(row_bytes, row_stride_bytes) of ``t`` seen as [rows, *R], or as [P, rows, *R] with
    ``row_dim=1``; rows must be contiguous."""
    shape_name = "[planes, rows, *row_shape]" if row_dim else "[rows, *row_shape]"
    if not isinstance(t, torch.Tensor) or t.dim() < row_dim + 1:
        raise ValueError(f"{name} must be a tensor of shape {shape_name}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    row_shape, row_strides = t.shape[row_dim + 1:], t.stride()[row_dim + 1:]
    row_numel = math.prod(row_shape)
    expected_stride = 1
    for size, stride in zip(reversed(row_shape), reversed(row_strides)):
        if row_numel and size != 1 and stride != expected_stride:
            raise ValueError(f"{name} rows must be contiguous (only {'dims 0 and 1' if row_dim else 'dim 0'} "
                             f"may be strided), got shape {tuple(t.shape)} with strides {t.stride()}; "
                             f"pass {name}.contiguous()")
        expected_stride *= size
    row_bytes = row_numel * t.element_size()
    # A single row's stride is meaningless (torch may report anything).
    stride_bytes = t.stride(row_dim) * t.element_size() if t.shape[row_dim] > 1 else row_bytes
    if stride_bytes < row_bytes:
        raise ValueError(f"{name} rows overlap: stride({row_dim})={t.stride(row_dim)} < {row_numel} "
                         f"elements per row (an expand()ed view?); pass {name}.contiguous()")
    return row_bytes, stride_bytes


def _check_indices(indices: torch.Tensor, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        got = (f"{indices.dtype} tensor of shape {tuple(indices.shape)}"
               if isinstance(indices, torch.Tensor) else type(indices).__name__)
        raise ValueError(f"{name} must be a 1-D torch.int64 tensor, got {got}")
    if indices.numel() > 1 and indices.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {indices.stride(0)}; "
                         f"pass {name}.contiguous()")


def _check_num_threads(num_threads: int) -> None:
    if not isinstance(num_threads, int) or isinstance(num_threads, bool):
        raise ValueError(f"num_threads must be an int (<= 0 lets the library choose), got {num_threads!r}")


def _launch_device(op: str, **tensors: torch.Tensor) -> torch.device | None:
    """None for the host path, else the one CUDA device the kernel runs on.

    Any CUDA tensor selects the kernel; every CPU tensor must then be pinned,
    since the kernel reads and writes host memory through its mapped alias.
    """
    for name, t in tensors.items():
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: {name} is on {t.device}; only CPU and CUDA tensors are supported")
    devices = {t.device for t in tensors.values() if t.is_cuda}
    if not devices:
        return None
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors span {sorted(map(str, devices))}; put them on one CUDA device")
    device = devices.pop()
    for name, t in tensors.items():
        if not t.is_cuda and not t.is_pinned():
            raise ValueError(f"{op}: {name} is in pageable CPU memory but the copy runs on {device}; "
                             f"pass {name}.to('{device}') or {name}.pin_memory()")
    return device


def _ptr(native: NativeLibrary, ctype: str, t: torch.Tensor):
    return native.ffi.cast(ctype, t.data_ptr())


def _call(native: NativeLibrary, op: str, args: tuple, device: torch.device | None, num_threads: int,
          cuda_op: str | None = None) -> None:
    """Run ``spc_<op>`` on the host (last argument: threads) or ``spc_cuda_<cuda_op or op>`` on
    the current stream of ``device`` (last argument: the stream), and raise on a bad status."""
    if device is None:
        status = getattr(native.lib, f"spc_{op}")(*args, num_threads)
    else:
        with torch.cuda.device(device):
            stream = native.ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)
            status = getattr(native.lib, f"spc_cuda_{cuda_op or op}")(*args, stream)
    raise_for(status)


def gather_rows(src: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None,
                num_threads: int = 0) -> torch.Tensor:
    """Gather rows by index: ``out[i] = src[indices[i]]``, a byte copy (any dtype).

    Runs the multi-threaded host copy when every tensor is on the CPU, else one
    CUDA kernel on ``torch.cuda.current_stream()`` (asynchronous, like any torch op).

    Args:
        src: [N, *R], any dtype; CPU, or CUDA / pinned CPU for the kernel. Rows
            contiguous; dim 0 may be strided.
        indices: [M] int64, contiguous; values in [0, N), repeats allowed. Same
            placement rules as ``src``.
        out: [M, *R], ``src.dtype``; rows contiguous. Default: a new tensor on the
            CUDA device if ``src`` or ``indices`` is on CUDA, else on the CPU.
        num_threads: host path only; <= 0 lets the library pick from the copy size.

    Returns:
        ``out``, [M, *R], ``src.dtype``.

    Raises:
        ValueError: wrong dtype, shape, layout or device (the message says what is expected).
        NativeError: status ``SPC_ERR_INDEX`` on the host path for an index
            outside [0, N) (``out`` is then untouched). The kernel does not check
            on the host (it would need a sync); it skips such rows instead.

    Example:
        >>> src = torch.arange(12.0).view(4, 3)
        >>> gather_rows(src, torch.tensor([3, 0, 3])).tolist()
        [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0], [9.0, 10.0, 11.0]]
    """
    _check_indices(indices)
    _check_num_threads(num_threads)
    src_row_bytes, src_stride_bytes = _row_layout("src", src)
    expected_shape = (indices.shape[0], *src.shape[1:])
    if out is None:
        device = src.device if src.is_cuda else indices.device if indices.is_cuda else "cpu"
        out = torch.empty(expected_shape, dtype=src.dtype, device=device)
    elif tuple(out.shape) != expected_shape or out.dtype != src.dtype:
        raise ValueError(f"out must be [len(indices), *src.shape[1:]] = {list(expected_shape)} of "
                         f"src.dtype {src.dtype}, got {list(out.shape)} of {out.dtype}")
    _, out_stride_bytes = _row_layout("out", out)
    device = _launch_device("gather_rows", src=src, indices=indices, out=out)
    native = library()
    args = (_ptr(native, "void *", src), src_stride_bytes, src.shape[0],
            _ptr(native, "int64_t *", indices), indices.shape[0],
            _ptr(native, "void *", out), out_stride_bytes, src_row_bytes)
    _call(native, "gather_rows", args, device, num_threads)
    return out


def scatter_rows(src: torch.Tensor, indices: torch.Tensor, dst: torch.Tensor,
                 num_threads: int = 0) -> torch.Tensor:
    """Scatter rows by index, in place: ``dst[indices[i]] = src[i]``, a byte copy (any dtype).

    Host path when every tensor is on the CPU, else one CUDA kernel on
    ``torch.cuda.current_stream()`` (e.g. device rows back into a pinned host cache).

    Args:
        src: [M, *R], any dtype; rows contiguous, dim 0 may be strided.
        indices: [M] int64, contiguous; UNIQUE values in [0, N) (with repeats,
            which row lands is unspecified).
        dst: [N, *R], ``src.dtype``; rows contiguous. Rows not named in
            ``indices`` are untouched. CPU, or CUDA / pinned CPU for the kernel.
        num_threads: host path only; <= 0 lets the library pick from the copy size.

    Returns:
        ``dst``.

    Raises:
        ValueError: wrong dtype, shape, layout or device.
        NativeError: ``SPC_ERR_INDEX`` on the host path for an index outside
            [0, N); ``dst`` is then untouched. The kernel skips such rows.

    Example:
        >>> dst = torch.zeros(4, 2)
        >>> scatter_rows(torch.ones(2, 2), torch.tensor([3, 1]), dst).tolist()
        [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    _check_indices(indices)
    _check_num_threads(num_threads)
    src_row_bytes, src_stride_bytes = _row_layout("src", src)
    _, dst_stride_bytes = _row_layout("dst", dst)
    if src.shape[0] != indices.shape[0]:
        raise ValueError(f"src must have one row per index ({indices.shape[0]}), got {src.shape[0]}")
    if dst.shape[1:] != src.shape[1:] or dst.dtype != src.dtype:
        raise ValueError(f"dst must be [N, *src.shape[1:]] = [N{''.join(f', {s}' for s in src.shape[1:])}] "
                         f"of src.dtype {src.dtype}, got {list(dst.shape)} of {dst.dtype}")
    device = _launch_device("scatter_rows", src=src, indices=indices, dst=dst)
    native = library()
    args = (_ptr(native, "void *", src), src_stride_bytes, _ptr(native, "int64_t *", indices),
            indices.shape[0], _ptr(native, "void *", dst), dst_stride_bytes, dst.shape[0],
            src_row_bytes)
    _call(native, "scatter_rows", args, device, num_threads)
    return dst


def copy_rows_planes(src: torch.Tensor, src_indices: torch.Tensor, dst: torch.Tensor,
                     dst_indices: torch.Tensor, num_threads: int = 0, method: str = "kernel") -> torch.Tensor:
    """Copy the same rows in every plane, in place: ``dst[p, dst_indices[i]] = src[p, src_indices[i]]``.

    Elastic KV loading: a step's missing rows of one layer, for its K and V planes at once.
    A byte copy (any dtype). Host path (threads, one memcpy per run of consecutive rows when rows
    are packed) when every tensor is on the CPU; else on ``torch.cuda.current_stream()``
    (asynchronous, like any torch op), as one kernel (``method="kernel"``) or as one
    cudaMemcpyAsync per run of consecutive rows and plane (``method="memcpy"``, for comparison).

    Args:
        src: [P, N, *R], any dtype; rows contiguous, planes and rows may be strided (not
            overlapping). CPU, or CUDA / pinned CPU for the CUDA path.
        src_indices: [M] int64, contiguous; values in [0, N), repeats allowed.
        dst: [P, N', *R], ``src.dtype``, same placement rules as ``src``; rows not named in
            ``dst_indices`` are untouched.
        dst_indices: [M] int64, contiguous; UNIQUE values in [0, N') (with repeats, which row
            lands is unspecified).
        num_threads: host path only; <= 0 lets the library pick from the copy size.
        method: CUDA path only. "kernel": indices on CUDA or pinned CPU, not checked on the host
            (out-of-range copies are skipped, in every plane). "memcpy": indices on the CPU (read
            and checked there during the call).

    Returns:
        ``dst``.

    Raises:
        ValueError: wrong dtype, shape, layout, device or method.
        NativeError: ``SPC_ERR_INDEX`` for an index out of range on the host path or with
            ``method="memcpy"`` (``dst`` is then untouched); ``SPC_ERR_INVALID_ARGUMENT`` if the
            planes of ``src`` or ``dst`` overlap.

    Example:
        >>> src, dst = torch.arange(12.0).view(2, 3, 2), torch.zeros(2, 4, 2)
        >>> copy_rows_planes(src, torch.tensor([2, 0]), dst, torch.tensor([1, 3]))[:, 1].tolist()
        [[4.0, 5.0], [10.0, 11.0]]
    """
    _check_indices(src_indices, "src_indices")
    _check_indices(dst_indices, "dst_indices")
    _check_num_threads(num_threads)
    if method not in ("kernel", "memcpy"):
        raise ValueError(f"method must be 'kernel' or 'memcpy', got {method!r}")
    if src_indices.shape[0] != dst_indices.shape[0]:
        raise ValueError(f"src_indices and dst_indices must have the same length, got "
                         f"{src_indices.shape[0]} and {dst_indices.shape[0]}")
    row_bytes, src_row_stride_bytes = _row_layout("src", src, row_dim=1)
    _, dst_row_stride_bytes = _row_layout("dst", dst, row_dim=1)
    if dst.shape[0] != src.shape[0] or dst.shape[2:] != src.shape[2:] or dst.dtype != src.dtype:
        rows = "".join(f", {s}" for s in src.shape[2:])
        raise ValueError(f"dst must be [src.shape[0], N', *src.shape[2:]] = [{src.shape[0]}, N'{rows}] "
                         f"of src.dtype {src.dtype}, got {list(dst.shape)} of {dst.dtype}")
    if method == "kernel":
        device = _launch_device("copy_rows_planes", src=src, src_indices=src_indices, dst=dst,
                                dst_indices=dst_indices)
    else:
        device = _launch_device("copy_rows_planes", src=src, dst=dst)
        for name, t in (("src_indices", src_indices), ("dst_indices", dst_indices)):
            if t.device.type != "cpu":
                raise ValueError(f"copy_rows_planes: method='memcpy' reads {name} on the host, but it "
                                 f"is on {t.device}; pass {name}.cpu() or use method='kernel'")
    # A single plane's stride is never used (and torch may report anything for it).
    num_planes = src.shape[0]
    src_plane_stride_bytes = src.stride(0) * src.element_size() if num_planes > 1 else 0
    dst_plane_stride_bytes = dst.stride(0) * dst.element_size() if num_planes > 1 else 0
    native = library()
    args = (_ptr(native, "void *", src), src_plane_stride_bytes, src_row_stride_bytes, src.shape[1],
            _ptr(native, "int64_t *", src_indices), _ptr(native, "void *", dst), dst_plane_stride_bytes,
            dst_row_stride_bytes, dst.shape[1], _ptr(native, "int64_t *", dst_indices),
            src_indices.shape[0], num_planes, row_bytes)
    _call(native, "copy_rows_planes", args, device, num_threads,
          cuda_op="copy_rows_planes" if method == "kernel" else "memcpy_rows_planes")
    return dst


def reference_gather_rows(src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pure-torch float32 reference for ``gather_rows``: [N, *R], [M] int64 -> [M, *R] float32."""
    return src.float().index_select(0, indices.to(src.device))


def reference_scatter_rows(src: torch.Tensor, indices: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Pure-torch float32 reference for ``scatter_rows``; returns a new [N, *R] float32 tensor."""
    return dst.float().index_copy(0, indices.to(dst.device), src.float().to(dst.device))


def reference_copy_rows_planes(src: torch.Tensor, src_indices: torch.Tensor, dst: torch.Tensor,
                               dst_indices: torch.Tensor) -> torch.Tensor:
    """Pure-torch float32 reference for ``copy_rows_planes``; returns a new [P, N', *R] float32 tensor."""
    rows = src.float().index_select(1, src_indices.to(src.device)).to(dst.device)
    return dst.float().index_copy(1, dst_indices.to(dst.device), rows)
