"""Binding to the native library (csrc/): gather, scatter and plane copies of KV-cache rows.

The cffi declarations are read at load time from the one public header,
``specontext.h`` (the region between its SPC_CDEF markers), never retyped here.
The library is loaded lazily on first use: from the ``SPECONTEXT_NATIVE_LIB``
override when it is set, else from the package directory, then from the
installed ``specontext`` distribution (when Python imported a source checkout
that shadows it, e.g. ``python -c`` run from the repository root).

Shape letters: N rows of the indexed buffer, M selected rows (``len(indices)``),
``*R`` the row shape (any trailing dims; each row must be contiguous, while
rows may be strided along dim 0, e.g. a slice of a larger buffer), P planes
(e.g. a layer's K and V, copied with the same row indices).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cffi
import torch

from .errors import SpecontextError

LIBRARY_NAME = "libspecontext_native.so"
LIBRARY_ENV_VAR = "SPECONTEXT_NATIVE_LIB"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CDEF_BEGIN, _CDEF_END = "/* SPC_CDEF_BEGIN */", "/* SPC_CDEF_END */"


class NativeLibraryError(SpecontextError, RuntimeError):
    """The native library or its header could not be found, loaded or matched."""


class NativeError(RuntimeError):
    """A native call returned a non-OK status.

    Attributes: ``status`` (the int code, e.g. ``SPC_ERR_INDEX`` = 2),
    ``status_name`` (``spc_status_string``), ``detail`` (``spc_last_error``).
    """

    def __init__(self, status: int, status_name: str, detail: str):
        super().__init__(f"{status_name} (status {status}): {detail or 'no detail'}")
        self.status, self.status_name, self.detail = status, status_name, detail


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded library: the cffi ``ffi``, the ``lib`` handle, and where both came from."""

    ffi: cffi.FFI
    lib: Any
    path: Path
    header_path: Path


def header_candidates(package_dir: Path = _PACKAGE_DIR) -> tuple[Path, Path]:
    """Where the header is looked for: installed next to the package, else the source tree."""
    return (package_dir / "include" / "specontext.h",
            package_dir.parent / "csrc" / "include" / "specontext.h")


def installed_package_dir() -> Path | None:
    """The installed distribution's package folder, if it is not the one imported (else None)."""
    try:
        located = Path(importlib.metadata.distribution("specontext").locate_file("specontext"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if located.is_dir() and located.resolve() != _PACKAGE_DIR else None


def read_cdef(header_path: Path) -> str:
    """The declarations between the SPC_CDEF markers of ``header_path``, for ``ffi.cdef``."""
    text = header_path.read_text()
    begin, end = text.find(_CDEF_BEGIN), text.find(_CDEF_END)
    if begin < 0 or end < begin:
        raise NativeLibraryError(f"{header_path} has no {_CDEF_BEGIN} ... {_CDEF_END} region")
    return text[begin + len(_CDEF_BEGIN):end]


def load_library(package_dir: Path = _PACKAGE_DIR,
                 environ: Mapping[str, str] = os.environ) -> NativeLibrary:
    """Find, load and bind the library; uncached (the wrappers share one via ``library()``).

    Args:
        package_dir: directory holding ``libspecontext_native.so`` and ``include/``
            (the installed ``specontext`` package by default).
        environ: where ``SPECONTEXT_NATIVE_LIB`` is read; it may name the ``.so`` or its folder.

    Raises:
        NativeLibraryError: one line naming every place looked and how to fix it.

    Example:
        >>> load_library().lib.spc_abi_version()
        1
    """
    installed = installed_package_dir() if package_dir == _PACKAGE_DIR else None
    headers = header_candidates(package_dir)
    header = next((h for h in headers if h.is_file()), None)
    if header is None:
        raise NativeLibraryError(f"specontext.h not found: looked at {headers[0]} and {headers[1]}; "
                                 "reinstall with `pip install .`")
    ffi = cffi.FFI()
    ffi.cdef(read_cdef(header))

    env_value = environ.get(LIBRARY_ENV_VAR, "")
    candidates = []
    if env_value:  # an explicit override comes first (e.g. a fresh CUDA build beside an installed CPU one)
        env_path = Path(env_value)
        candidates.append((f"${LIBRARY_ENV_VAR}", env_path / LIBRARY_NAME if env_path.is_dir() else env_path))
    candidates.append(("package", package_dir / LIBRARY_NAME))
    if installed is not None:
        candidates.append(("installed package", installed / LIBRARY_NAME))
    failures = []
    for where, path in candidates:
        if not path.is_file():
            failures.append(f"{where} {path}: not found")
            continue
        try:
            lib = ffi.dlopen(str(path))
        except OSError as exc:
            failures.append(f"{where} {path}: {' '.join(str(exc).split())}")
            continue
        if lib.spc_abi_version() != lib.SPC_ABI_VERSION:
            failures.append(f"{where} {path}: ABI {lib.spc_abi_version()} but {header} declares "
                            f"{lib.SPC_ABI_VERSION} (stale build)")
            continue
        return NativeLibrary(ffi, lib, path, header)
    if not env_value:
        failures.append(f"${LIBRARY_ENV_VAR}: not set")
    raise NativeLibraryError(f"cannot load {LIBRARY_NAME}: " + "; ".join(failures) +
                             f"; fix: `pip install .` (builds it into the package) or set "
                             f"{LIBRARY_ENV_VAR} to a built {LIBRARY_NAME}")


_loaded: NativeLibrary | None = None
_load_lock = threading.Lock()


def library() -> NativeLibrary:
    """The shared, lazily loaded library (``.lib.SPC_ERR_INDEX`` etc. give the status codes).

    Raises:
        NativeLibraryError: on the first call, if it cannot be loaded (see ``load_library``).
    """
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                _loaded = load_library()
    return _loaded


def library_path() -> str:
    """Path of the loaded native library (loads it on first call)."""
    return str(library().path)


def cuda_available() -> bool:
    """True if the library was built with CUDA and a device is usable; never raises for lack of a GPU."""
    return bool(library().lib.spc_cuda_available())


def cuda_build() -> dict | None:
    """What CUDA the library was compiled with, without needing a device, or None if built without it.

    Returns:
        ``{"cudart": 13000, "archs": [750, 800, 900]}``: the runtime version the kernels were
        built against and the compiled architectures (compute capability x 10; empty when the
        compiler did not say).
    """
    native = library()
    version = int(native.lib.spc_cuda_compiled())
    if version == 0:
        return None
    text = native.ffi.string(native.lib.spc_cuda_archs()).decode()
    archs = [int(a) for a in text.split(",") if a.strip().isdigit()]
    return {"cudart": version, "archs": archs}


def _raise_for(status: int) -> None:
    if status != 0:
        native = library()
        raise NativeError(status, native.ffi.string(native.lib.spc_status_string(status)).decode(),
                          native.ffi.string(native.lib.spc_last_error()).decode())


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
    _raise_for(status)


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
