"""Binding to the native library (csrc/): gather, scatter and plane copies of KV-cache rows.

:mod:`.library` finds, loads and binds ``libspecontext_native.so`` (declarations read from the one
public header, ``specontext.h``); :mod:`.rows` holds the checked wrappers, one per native call,
and the float32 reference each is tested against. Both are used through this package::

    from specontext import native
    out = native.gather_rows(src, indices)   # == native.reference_gather_rows(src, indices)
"""

from .library import (LIBRARY_ENV_VAR, LIBRARY_NAME, NativeError, NativeLibrary, NativeLibraryError, cuda_available,
                      cuda_build, header_candidates, init_operators, installed_package_dir, library, library_path,
                      load_library, read_cdef, register_fakes, torch_cpu_library)
from .rows import (copy_rows_planes, gather_rows, reference_copy_rows_planes, reference_gather_rows,
                   reference_scatter_rows, scatter_rows)

__all__ = ["LIBRARY_ENV_VAR", "LIBRARY_NAME", "NativeError", "NativeLibrary", "NativeLibraryError", "copy_rows_planes",
           "cuda_available", "cuda_build", "gather_rows", "header_candidates", "init_operators", "installed_package_dir",
           "library",
           "library_path", "load_library", "read_cdef", "register_fakes", "reference_copy_rows_planes", "reference_gather_rows",
           "reference_scatter_rows", "scatter_rows", "torch_cpu_library"]
