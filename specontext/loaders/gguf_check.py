"""A bounded walk over a GGUF file's header before anything else reads it.

The ``gguf`` package trusts the counts and lengths a header gives: a file that claims 2^60
metadata entries, a string 2^40 bytes long or a tensor past the end of the file makes it loop for
hours, allocate what the header says, or fail deep inside numpy. Model files come from anywhere,
so :func:`check_gguf_layout` reads the header itself first and checks every count and length
against the bytes that are really there: each field must fit in what is left of the file before
it is read, each tensor's data must lie inside the file, and nothing is allocated from a size
field before the bytes it sizes are there. Reading a header takes time and memory proportional to
the file's size (its arrays become Python objects: up to about 16 bytes of memory per byte).

The header is read through the file, never memory-mapped: a file truncated by another program
while it is read gives a short read and a clear error, where a mapping would fault (SIGBUS).

The walk also decodes what it reads (:class:`GGUFLayout`'s ``metadata`` and ``tensors``), so the
loader needs no second reader: the ``gguf`` package's keeps a numpy view per vocabulary entry,
a 160 MiB transient for the default model's 49,152 tokens (more for the 128k-152k vocabularies
of 8B models), the largest of a load. The ``gguf`` package still dequantizes the tensors.

Layout (GGUF v2 and v3, little-endian): ``GGUF``, u32 version, u64 tensor count, u64 metadata
count; each metadata entry a string key (u64 length + bytes), a u32 value type and the value
(an array: u32 element type, u64 count, elements); each tensor a string name, u32 dimension
count, u64 dimensions, u32 GGML type and u64 offset into the data section, which starts at the
next multiple of ``general.alignment`` (32 by default) after the header.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field

from ..errors import ModelFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 1 << 16
_CHUNK = 1 << 20
# scalar value type -> struct format and size in bytes (8 is a string, 9 an array)
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {t: struct.calcsize("<" + c) for t, c in _FORMATS.items()}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFLayout:
    """What the walk found: the file's size and identity when it was read, where the data section
    starts, and the header's metadata and tensors, read through the file, never memory-mapped."""

    size: int
    data_start: int
    stat: os.stat_result
    metadata: dict = field(default_factory=dict)  # key -> int, float, bool, str or a list of them
    tensors: tuple[TensorEntry, ...] = ()


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as the header lists it: ``dims`` fastest first (GGUF's order), ``offset`` into
    the data section, ``n_bytes`` of stored data."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


class _Reader:
    """Reads the header from ``f`` as the walk needs it, in chunks, never past the file's size."""

    def __init__(self, f, path: str, size: int):
        self.f, self.buf, self.pos, self.path, self.size = f, bytearray(), 0, path, size

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is not a valid GGUF file ({what} at byte {self.pos}; "
                              f"the file has {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes past the end of the file")
        self.load(self.pos + n)

    def load(self, end: int) -> None:
        """Have the file's first ``end`` bytes in ``buf`` (``end`` is within the size checked)."""
        while len(self.buf) < end:
            chunk = self.f.read(max(end - len(self.buf), _CHUNK))
            if not chunk:
                raise ModelFileError(f"{self.path} changed while it was being read (it is shorter than its "
                                     f"{self.size} bytes now); load it again once it is complete")
            self.buf += chunk

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        value = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return value



def _text(raw: bytes) -> str | None:
    """UTF-8 text, or None where it is not: a field that cannot be decoded is reported only if the
    loader needs it (a vocabulary whose undecodable tokens became one replacement string would
    merge distinct tokens)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_value(r: _Reader, vtype: int, key: str, depth: int = 0):
    """Read one value of ``vtype``: an int, float or bool, a str, or a list of them for an array;
    None for text that is not UTF-8 (a string, or an array holding one).

    Bounds are checked before anything is read, but an array the file does hold becomes Python
    objects: about 16 bytes of memory per byte of a uint8 array (a vocabulary of 49,152 tokens:
    a few MiB)."""
    if vtype in _SCALAR_SIZES:
        return r.unpack("<" + _FORMATS[vtype], f"the value of {key}")
    if vtype == _STRING:
        return _text(r.string(f"the value of {key}"))
    if vtype == _ARRAY:
        if depth > 0:
            raise r.fail(f"{key} is an array of arrays")
        etype = r.unpack("<I", f"the element type of {key}")
        count = r.unpack("<Q", f"the length of {key}")
        if etype in _SCALAR_SIZES:
            n = count * _SCALAR_SIZES[etype]
            r.need(n, f"the {count} elements of {key}")
            values = list(struct.unpack_from(f"<{count}{_FORMATS[etype]}", r.buf, r.pos))
            r.pos += n
            return values
        if etype == _STRING:
            if count * 8 > r.size - r.pos:  # every string takes at least its 8-byte length
                raise r.fail(f"{key} claims {count} strings, more than the file can hold")
            values = [_text(r.string(f"a string of {key}")) for _ in range(count)]
            return None if None in values else values
        raise r.fail(f"{key} has an unknown element type {etype}")
    raise r.fail(f"{key} has an unknown value type {vtype}")


def check_gguf_layout(path: str, f=None) -> GGUFLayout:
    """The header's layout; raise ModelFileError, naming what is wrong and where, unless it is
    consistent. ``f``: the file, already open for reading at its start (else ``path`` is opened).

    Example:
        >>> check_gguf_layout(default_model_path()).data_start  # doctest: +SKIP
    """
    try:
        with contextlib.ExitStack() as stack:
            if f is None:
                f = stack.enter_context(open(path, "rb"))
            stat = os.fstat(f.fileno())
            if stat.st_size == 0:
                raise ModelFileError(f"{path} is empty, not a GGUF file")
            r = _Reader(f, path, stat.st_size)
            data_start, metadata, tensors = _check(r)
            return GGUFLayout(stat.st_size, data_start, stat, metadata, tensors)
    except ModelFileError:
        raise
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path} is a directory, expected a .gguf file") from None
    except PermissionError:
        raise ModelFileError(f"model file is not readable: {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from None


def _check(r: _Reader) -> tuple[int, dict, tuple[TensorEntry, ...]]:
    """Walk the header: the byte where the data section starts, the metadata and the tensors."""
    import gguf

    r.need(4, "the magic number")
    if bytes(r.buf[:4]) != MAGIC:
        raise ModelFileError(f"{r.path} is not a GGUF file (it does not start with 'GGUF')")
    r.pos = 4
    version = r.unpack("<I", "the version")
    if version not in VERSIONS:
        raise r.fail(f"version {version} is not supported (GGUF {' or '.join(map(str, VERSIONS))})")
    n_tensors = r.unpack("<Q", "the tensor count")
    n_kv = r.unpack("<Q", "the metadata count")
    # the smallest entries: a 1-byte key and a 1-byte value; a 1-byte name, 1 dim, type and offset
    if n_kv * (8 + 1 + 4 + 1) > r.size - r.pos or n_tensors * (8 + 1 + 4 + 8 + 4 + 8) > r.size - r.pos:
        raise r.fail(f"it claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold")
    alignment = 32
    metadata = {}
    for _ in range(n_kv):
        key = r.string("a metadata key", MAX_KEY_BYTES).decode("utf-8", "replace")
        vtype = r.unpack("<I", f"the type of {key}")
        if key in metadata:
            raise r.fail(f"metadata key {key} appears twice")
        value = metadata[key] = _read_value(r, vtype, key)
        if key == "general.alignment":
            if vtype != 4 or value <= 0 or value & (value - 1) or value > 1 << 20:
                raise r.fail(f"general.alignment is {value!r}, not a uint32 power of two")
            alignment = value
    tensors, names = [], set()
    for _ in range(n_tensors):
        name = r.string("a tensor name", MAX_KEY_BYTES).decode("utf-8", "replace")
        if name in names:
            raise r.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = r.unpack("<I", f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [r.unpack("<Q", f"a dimension of {name}") for _ in range(n_dims)]
        ggml_type = r.unpack("<I", f"the type of {name}")
        offset = r.unpack("<Q", f"the data offset of {name}")
        tensors.append((name, dims, ggml_type, offset))
    data_start = -(-r.pos // alignment) * alignment
    entries = []
    for name, dims, ggml_type, offset in tensors:
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name} has an unknown GGML type {ggml_type}") from None
        count = 1
        for d in dims:
            if d == 0 or d > r.size * 256:  # no dimension can exceed what 256 values per byte could hold
                raise r.fail(f"tensor {name} has a dimension of {d}")
            count *= d
        if dims[0] % block:
            raise r.fail(f"tensor {name}'s first dimension {dims[0]} is not a multiple of its block size {block}")
        nbytes = count // block * type_bytes
        if offset % alignment or data_start + offset + nbytes > r.size:
            raise r.fail(f"tensor {name} ({nbytes} bytes at data offset {offset}) lies outside the file "
                         f"or off its {alignment}-byte alignment")
        entries.append(TensorEntry(name, tuple(dims), ggml_type, offset, nbytes))
    return data_start, metadata, tuple(entries)
