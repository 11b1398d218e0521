"""Finding, loading and binding the native library; its errors and what it was built with.

The cffi declarations are read at load time from the one public header, ``specontext.h`` (the
region between its SPC_CDEF markers), never retyped here. The library is loaded lazily on first
use: from the ``SPECONTEXT_NATIVE_LIB`` override when it is set, else from the package directory,
then from the installed ``specontext`` distribution (when Python imported a source checkout that
shadows it, e.g. ``python -c`` run from the repository root).
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cffi

from ..errors import SpecontextError

LIBRARY_NAME = "libspecontext_native.so"
LIBRARY_ENV_VAR = "SPECONTEXT_NATIVE_LIB"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the specontext package: the library installs there
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


def raise_for(status: int) -> None:
    """Raise :class:`NativeError` for a non-OK ``status`` of a native call (with the library's detail)."""
    if status != 0:
        native = library()
        raise NativeError(status, native.ffi.string(native.lib.spc_status_string(status)).decode(),
                          native.ffi.string(native.lib.spc_last_error()).decode())


def torch_cpu_library() -> str:
    """The path of the libtorch_cpu this process loaded with torch, in which the native library
    finds torch's stable C ABI and OpenMP runtime (its operators register there)."""
    import torch

    return os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def init_operators(init: str, operators: tuple[str, ...]) -> bool:
    """Whether the native library loads and its ``init`` entry point (``spc_attention_init``,
    ``spc_qmm_init``) registered its torch ``operators`` in this process's torch (they are then
    traceable: :func:`register_fakes`)."""
    try:
        lib = library()
    except NativeLibraryError:
        return False
    if getattr(lib.lib, init)(torch_cpu_library().encode()) != 0:
        return False
    register_fakes(operators)
    return True


def register_fakes(operators: tuple[str, ...]) -> None:
    """Shapes for tracing (torch.export, torch.compile) of native ``specontext::`` operators, each of
    which writes its first argument only and returns nothing."""
    import torch

    for name in operators:
        torch.library.register_fake(f"specontext::{name}")(_writes_its_first_argument)


def _writes_its_first_argument(*args, **kwargs) -> None:
    return None
