"""Native row gather/scatter/plane copies against the pure-torch float32 references.

Shape letters: N rows of the indexed buffer, M selected rows, *R row shape, P planes.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from specontext import native

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
ROW_SHAPES = [(1,), (3,), (7,), (17,), (257,), (3, 7)]
NUM_ROWS = [1, 5, 1031]
THREADS = [1, 2, 3, 0]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_rows(shape, dtype, device="cpu", generator=None):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype).to(device)
    return torch.randint(-128, 128, shape, generator=generator).to(dtype).to(device)


def num_selected(n: int) -> list[int]:
    return [0, 1, 2 * n + 1]  # empty, single, odd and larger than N (forces repeats)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---- host path ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", THREADS)
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_reference(dtype, row_shape, num_threads, gen):
    for n in NUM_ROWS:
        src = random_rows((n, *row_shape), dtype, generator=gen)
        for m in num_selected(n):
            indices = torch.randint(0, n, (m,), generator=gen)
            out = native.gather_rows(src, indices, num_threads=num_threads)
            assert out.shape == (m, *row_shape) and out.dtype == dtype
            assert torch.equal(out.float(), native.reference_gather_rows(src, indices))


@pytest.mark.parametrize("num_threads", THREADS)
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_matches_reference(dtype, row_shape, num_threads, gen):
    for n in NUM_ROWS:
        for m in (0, 1, n // 2 + 1, n):
            dst = random_rows((n, *row_shape), dtype, generator=gen)
            src = random_rows((m, *row_shape), dtype, generator=gen)
            indices = torch.randperm(n, generator=gen)[:m]
            expected = native.reference_scatter_rows(src, indices, dst)
            assert native.scatter_rows(src, indices, dst, num_threads=num_threads) is dst
            assert torch.equal(dst.float(), expected)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_strided_rows_and_padding_untouched(num_threads, gen):
    n, d, pad = 1031, 17, 5
    src_buffer = random_rows((n, d + pad), torch.float16, generator=gen)
    src = src_buffer[:, 2:2 + d]  # rows contiguous, stride d + pad, offset start
    indices = torch.randint(0, n, (301,), generator=gen)
    out_buffer = torch.full((301, d + 3), -7.0, dtype=torch.float16)
    out = native.gather_rows(src, indices, out=out_buffer[:, 1:1 + d], num_threads=num_threads)
    assert torch.equal(out.float(), native.reference_gather_rows(src, indices))
    assert (out_buffer[:, 0] == -7).all() and (out_buffer[:, 1 + d:] == -7).all()

    every_third = src_buffer[::3]  # strided along dim 0 only
    indices = torch.randint(0, every_third.shape[0], (77,), generator=gen)
    assert torch.equal(native.gather_rows(every_third, indices).float(),
                       native.reference_gather_rows(every_third, indices))

    dst_buffer = random_rows((n, d + pad), torch.float16, generator=gen)
    before = dst_buffer.clone()
    rows = torch.randperm(n, generator=gen)[:400]
    values = random_rows((400, d), torch.float16, generator=gen)
    expected = native.reference_scatter_rows(values, rows, dst_buffer[:, 2:2 + d])
    native.scatter_rows(values, rows, dst_buffer[:, 2:2 + d], num_threads=num_threads)
    assert torch.equal(dst_buffer[:, 2:2 + d].float(), expected)
    assert torch.equal(dst_buffer[:, :2], before[:, :2]) and torch.equal(dst_buffer[:, 2 + d:], before[:, 2 + d:])


@pytest.mark.parametrize("num_threads", [0, 2, 1000])
def test_large_copy_threads(num_threads, gen):
    # 4 MiB moved: above the auto-threading threshold, so num_threads=0 really splits;
    # 1000 exceeds the library's cap and must still work.
    src = random_rows((8193, 256), torch.float32, generator=gen)
    indices = torch.randint(0, 8193, (4099,), generator=gen)
    assert torch.equal(native.gather_rows(src, indices, num_threads=num_threads),
                       native.reference_gather_rows(src, indices))


def test_zero_size_rows():
    src = torch.empty(4, 0)
    assert native.gather_rows(src, torch.tensor([3, 1])).shape == (2, 0)


@pytest.mark.parametrize("bad_index", [5, -1, 1 << 40])
def test_out_of_range_index_raises_and_leaves_dst_untouched(bad_index):
    src = torch.arange(15.0).view(5, 3)
    indices = torch.tensor([0, 4, bad_index, 1])
    out = torch.full((4, 3), -1.0)
    with pytest.raises(native.NativeError, match="index out of range") as info:
        native.gather_rows(src, indices, out=out, num_threads=2)
    assert info.value.status == native.library().lib.SPC_ERR_INDEX
    assert f"indices[2]={bad_index}" in info.value.detail
    assert (out == -1).all()

    dst = torch.full((5, 3), -1.0)
    with pytest.raises(native.NativeError, match="index out of range"):
        native.scatter_rows(torch.ones(4, 3), indices, dst)
    assert (dst == -1).all()


def test_bad_arguments_raise_value_error():
    src = torch.zeros(6, 4)
    idx = torch.tensor([1, 2])
    cases = [
        (lambda: native.gather_rows(src, idx, out=torch.zeros(2, 4, dtype=torch.float16)), "dtype|float16"),
        (lambda: native.gather_rows(src, idx, out=torch.zeros(3, 4)), r"\[2, 4\]"),
        (lambda: native.gather_rows(src, idx.int()), "int64"),
        (lambda: native.gather_rows(src, idx.view(1, 2)), "1-D"),
        (lambda: native.gather_rows(src, torch.arange(4)[::2]), "contiguous"),
        (lambda: native.gather_rows(torch.zeros(4, 6).t(), idx), "rows must be contiguous"),
        (lambda: native.gather_rows(torch.zeros(1, 4).expand(6, 4), idx), "overlap"),
        (lambda: native.gather_rows(torch.tensor(1.0), idx), r"\[rows"),
        (lambda: native.gather_rows(src, idx, num_threads=1.5), "num_threads"),
        (lambda: native.scatter_rows(torch.zeros(3, 4), idx, src), "one row per index"),
        (lambda: native.scatter_rows(torch.zeros(2, 5), idx, src), r"\[N, 5\]"),
        (lambda: native.scatter_rows(torch.zeros(2, 4, dtype=torch.int8), idx, src), "int8"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_c_argument_validation():
    nat = native.library()
    ffi, lib = nat.ffi, nat.lib
    buf = torch.zeros(4, 4)
    idx = torch.tensor([0, 1])
    p, ip = ffi.cast("void *", buf.data_ptr()), ffi.cast("int64_t *", idx.data_ptr())
    calls = [
        (lambda: lib.spc_gather_rows(ffi.NULL, 16, 4, ip, 2, p, 16, 16, 1), "NULL src"),
        (lambda: lib.spc_gather_rows(p, 16, 4, ffi.NULL, 2, p, 16, 16, 1), "NULL indices"),
        (lambda: lib.spc_scatter_rows(p, 16, ip, 2, ffi.NULL, 16, 4, 16, 1), "NULL dst"),
        (lambda: lib.spc_gather_rows(p, 16, -1, ip, 2, p, 16, 16, 1), ">= 0"),
        (lambda: lib.spc_gather_rows(p, 8, 4, ip, 2, p, 16, 16, 1), "row strides"),
    ]
    for call, detail in calls:
        assert call() == lib.SPC_ERR_INVALID_ARGUMENT
        assert detail in ffi.string(lib.spc_last_error()).decode()
    # Empty copies accept NULL, and a success clears the previous detail.
    assert lib.spc_gather_rows(ffi.NULL, 0, 0, ffi.NULL, 0, ffi.NULL, 0, 0, 0) == lib.SPC_OK
    assert ffi.string(lib.spc_last_error()) == b""
    names = {ffi.string(lib.spc_status_string(s)).decode() for s in range(5)}
    assert len(names) == 5 and ffi.string(lib.spc_status_string(99)) == b"unknown status"


# ---- plane copies (host path) ------------------------------------------------------------

# Row byte sizes: 1 to 84 bytes, all odd element counts, so no width is a power of two.
PLANE_ROW_SHAPES = [(1,), (3,), (17,), (3, 7)]
# (rows in src, rows in dst): single row, tiny, and larger than the dst.
PLANE_NUM_ROWS = [(1, 1), (5, 7), (1031, 517)]


def plane_layouts(num_planes, num_rows, row_shape, dtype, generator):
    """(name, buffer, view) triples: view is [P, num_rows, *R] over buffer, packed (rows are
    consecutive, the coalescing path), strided (planes and rows padded, unaligned offsets) or
    interleaved (a [N, P, *R] buffer seen plane-major, like a K/V-interleaved cache)."""
    numel = math.prod(row_shape)
    packed = random_rows((num_planes, num_rows, *row_shape), dtype, generator=generator)
    padded = random_rows((num_planes + 1, num_rows + 3, numel + 5), dtype, generator=generator)
    interleaved = random_rows((num_rows, num_planes, numel), dtype, generator=generator)
    return [
        ("packed", packed, lambda b: b),
        ("strided", padded, lambda b: b[1:, 2:2 + num_rows, 1:1 + numel].unflatten(-1, row_shape)),
        ("interleaved", interleaved, lambda b: b.transpose(0, 1).unflatten(-1, row_shape)),
    ]


def plane_index_patterns(num_src_rows, num_dst_rows, generator):
    """(name, src_indices, dst_indices) with unique dst indices: empty, random (src repeats),
    runs (blocks of consecutive rows on both sides, in random block order) and mixed
    (consecutive src rows into sorted random dst rows: runs wherever the dst rows touch)."""
    m = num_dst_rows // 2 + 1
    random_pair = (torch.randint(0, num_src_rows, (m,), generator=generator),
                   torch.randperm(num_dst_rows, generator=generator)[:m])
    block = min(7, num_src_rows, num_dst_rows)
    num_blocks = min(num_src_rows // block, num_dst_rows // block)
    offsets = torch.arange(block)
    src_starts = torch.randperm(num_src_rows // block, generator=generator)[:num_blocks] * block
    dst_starts = torch.randperm(num_dst_rows // block, generator=generator)[:num_blocks] * block
    runs_pair = ((src_starts[:, None] + offsets).flatten(), (dst_starts[:, None] + offsets).flatten())
    m = min(num_src_rows, num_dst_rows) * 2 // 3 + 1
    first = int(torch.randint(0, num_src_rows - m + 1, (1,), generator=generator))
    mixed_pair = (torch.arange(first, first + m),
                  torch.randperm(num_dst_rows, generator=generator)[:m].sort().values)
    empty = torch.empty(0, dtype=torch.int64)
    return [("empty", empty, empty), ("random", *random_pair), ("runs", *runs_pair),
            ("mixed", *mixed_pair)]


@pytest.mark.parametrize("num_threads", [1, 2, 0])
@pytest.mark.parametrize("num_planes", [1, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_rows_planes_matches_reference(dtype, num_planes, num_threads, gen):
    for row_shape in PLANE_ROW_SHAPES:
        for num_src_rows, num_dst_rows in PLANE_NUM_ROWS:
            for src_layout, src_buffer, src_view in plane_layouts(num_planes, num_src_rows, row_shape,
                                                                  dtype, gen):
                src = src_view(src_buffer)
                for dst_layout, dst_buffer, dst_view in plane_layouts(num_planes, num_dst_rows, row_shape,
                                                                      dtype, gen):
                    for pattern, src_indices, dst_indices in plane_index_patterns(num_src_rows,
                                                                                  num_dst_rows, gen):
                        case = (row_shape, num_src_rows, num_dst_rows, src_layout, dst_layout, pattern)
                        # Expected for the whole buffer: the view's rows per the reference,
                        # everything else (padding, other planes) as it was.
                        expected = dst_buffer.float().clone()  # .float() of float32 is no copy
                        dst_view(expected).copy_(native.reference_copy_rows_planes(
                            src, src_indices, dst_view(dst_buffer), dst_indices))
                        dst = dst_view(dst_buffer)
                        assert native.copy_rows_planes(src, src_indices, dst, dst_indices,
                                                       num_threads=num_threads) is dst
                        assert torch.equal(dst_buffer.float(), expected), case


@pytest.mark.parametrize("num_threads", [0, 2, 3, 1000])
def test_copy_rows_planes_large_and_split_across_planes(num_threads, gen):
    # 2 planes x 4099 rows x 1 KiB = 8 MiB: auto mode really splits; with 3 threads the
    # slices start mid-plane and mid-run; 1000 exceeds the library's cap.
    src = random_rows((2, 8193, 256), torch.float32, generator=gen)
    dst = random_rows((2, 5003, 256), torch.float32, generator=gen)
    src_indices = torch.cat([torch.arange(100, 2100), torch.randint(0, 8193, (2099,), generator=gen)])
    dst_indices = torch.randperm(5003, generator=gen)[:4099]
    dst_indices[:2000] = torch.arange(3000, 5000)
    dst_indices[2000:] = torch.randperm(3000, generator=gen)[:2099]
    expected = native.reference_copy_rows_planes(src, src_indices, dst, dst_indices)
    native.copy_rows_planes(src, src_indices, dst, dst_indices, num_threads=num_threads)
    assert torch.equal(dst, expected)


def test_copy_rows_planes_kv_cache_views(gen):
    # The offloaded cache's use: [2, B, G, S, D] host K/V of one layer, seen as [2, B*G*S, D],
    # into [2, B*G*P, D] slots; one call moves both planes.
    host = random_rows((2, 2, 3, 41, 24), torch.bfloat16, generator=gen)
    slots = torch.zeros(2, 2 * 3 * 9, 24, dtype=torch.bfloat16)
    src_indices = torch.randperm(2 * 3 * 41, generator=gen)[:30]
    dst_indices = torch.randperm(2 * 3 * 9, generator=gen)[:30]
    expected = native.reference_copy_rows_planes(host.view(2, -1, 24), src_indices, slots, dst_indices)
    native.copy_rows_planes(host.view(2, -1, 24), src_indices, slots, dst_indices)
    assert torch.equal(slots.float(), expected)
    assert torch.equal(slots[1, dst_indices], host.view(2, -1, 24)[1, src_indices])


@pytest.mark.parametrize("bad_list", ["src_indices", "dst_indices"])
@pytest.mark.parametrize("bad_index", [-1, "rows", 1 << 40])
def test_copy_rows_planes_out_of_range_raises_and_leaves_dst_untouched(bad_list, bad_index):
    src = torch.arange(3 * 5 * 4.0).view(3, 5, 4)
    dst = torch.full((3, 6, 4), -1.0)
    num_rows = 5 if bad_list == "src_indices" else 6
    bad_index = num_rows if bad_index == "rows" else bad_index
    indices = {"src_indices": torch.tensor([0, 4, 3, 1]), "dst_indices": torch.tensor([5, 0, 2, 1])}
    indices[bad_list][2] = bad_index
    with pytest.raises(native.NativeError, match="index out of range") as info:
        native.copy_rows_planes(src, indices["src_indices"], dst, indices["dst_indices"], num_threads=2)
    assert info.value.status == native.library().lib.SPC_ERR_INDEX
    assert f"{bad_list}[2]={bad_index} outside [0, {num_rows})" in info.value.detail
    assert (dst == -1).all()


def test_copy_rows_planes_empty_copies(gen):
    src = random_rows((3, 5, 4), torch.float16, generator=gen)
    dst = torch.full((3, 6, 4), -1.0, dtype=torch.float16)
    empty = torch.empty(0, dtype=torch.int64)
    assert native.copy_rows_planes(src, empty, dst, empty) is dst and (dst == -1).all()
    # Zero planes: nothing to copy, but indices are still checked (as for zero-byte rows).
    no_planes_src, no_planes_dst = torch.empty(0, 5, 4), torch.empty(0, 6, 4)
    native.copy_rows_planes(no_planes_src, torch.tensor([4, 0]), no_planes_dst, torch.tensor([5, 1]))
    with pytest.raises(native.NativeError, match="index out of range"):
        native.copy_rows_planes(no_planes_src, torch.tensor([5]), no_planes_dst, torch.tensor([0]))
    # Zero-byte rows.
    native.copy_rows_planes(torch.empty(3, 5, 0), torch.tensor([1]), torch.empty(3, 6, 0), torch.tensor([2]))


def test_copy_rows_planes_bad_arguments():
    src, dst = torch.zeros(2, 6, 4), torch.zeros(2, 5, 4)
    idx = torch.tensor([1, 2])
    value_errors = [
        (lambda: native.copy_rows_planes(src, idx, dst.half(), idx), "float16"),
        (lambda: native.copy_rows_planes(src, idx, torch.zeros(3, 5, 4), idx), r"\[2, N', 4\]"),
        (lambda: native.copy_rows_planes(src, idx, torch.zeros(2, 5, 3), idx), r"\[2, N', 4\]"),
        (lambda: native.copy_rows_planes(src, idx, dst, torch.tensor([1, 2, 3])), "same length"),
        (lambda: native.copy_rows_planes(src, idx.int(), dst, idx), "src_indices must be a 1-D torch.int64"),
        (lambda: native.copy_rows_planes(src, idx, dst, idx.view(1, 2)), "dst_indices must be a 1-D"),
        (lambda: native.copy_rows_planes(src, torch.arange(4)[::2], dst, idx), "src_indices must be contiguous"),
        (lambda: native.copy_rows_planes(torch.zeros(2, 4, 6).transpose(1, 2), idx, dst, idx),
         "rows must be contiguous"),
        (lambda: native.copy_rows_planes(src, idx, torch.zeros(2, 1, 4).expand(2, 5, 4), idx), "rows overlap"),
        (lambda: native.copy_rows_planes(torch.zeros(6), idx, dst, idx), r"\[planes, rows"),
        (lambda: native.copy_rows_planes(src, idx, dst, idx, num_threads=None), "num_threads"),
        (lambda: native.copy_rows_planes(src, idx, dst, idx, method="dma"), "method"),
    ]
    for call, pattern in value_errors:
        with pytest.raises(ValueError, match=pattern):
            call()
    # Overlapping planes (an expand()ed plane dim) pass the shape checks; the library refuses them.
    broadcast_src, broadcast_dst = torch.zeros(1, 6, 4).expand(2, 6, 4), torch.zeros(1, 5, 4).expand(2, 5, 4)
    for name, a, b in (("src", broadcast_src, dst), ("dst", src, broadcast_dst)):
        with pytest.raises(native.NativeError, match="invalid argument") as info:
            native.copy_rows_planes(a, idx, b, idx)
        assert f"{name} planes overlap" in info.value.detail


def test_copy_rows_planes_c_argument_validation():
    nat = native.library()
    ffi, lib = nat.ffi, nat.lib
    buf = torch.zeros(2, 4, 4)  # 2 planes x 4 rows x 16 bytes
    idx = torch.tensor([0, 1])
    p, ip = ffi.cast("void *", buf.data_ptr()), ffi.cast("int64_t *", idx.data_ptr())

    def call(src=p, sps=64, srs=16, ns=4, si=ip, dst=p, dps=64, drs=16, nd=4, di=ip, m=2, planes=2, rb=16):
        return lib.spc_copy_rows_planes(src, sps, srs, ns, si, dst, dps, drs, nd, di, m, planes, rb, 1)

    calls = [
        (dict(src=ffi.NULL), "NULL src"),
        (dict(dst=ffi.NULL), "NULL dst"),
        (dict(si=ffi.NULL), "NULL src_indices"),
        (dict(di=ffi.NULL), "NULL dst_indices"),
        (dict(planes=-1), ">= 0"),
        (dict(nd=-1), ">= 0"),
        (dict(srs=8), "row strides"),
        (dict(sps=48), "src planes overlap"),      # stacked but 4 rows need 64 bytes
        (dict(dps=0), "dst planes overlap"),       # broadcast
        (dict(drs=24, dps=16), "dst planes overlap"),  # interleaved but 2 x 16 bytes > 24
        (dict(m=1 << 62, planes=4), "overflows"),
    ]
    for kwargs, detail in calls:
        assert call(**kwargs) == lib.SPC_ERR_INVALID_ARGUMENT, kwargs
        assert detail in ffi.string(lib.spc_last_error()).decode(), kwargs
    # Accepted: interleaved planes (16-byte rows 32 bytes apart, planes 16 apart), one plane with
    # any plane stride, and nothing to copy with NULL buffers; success clears the detail.
    assert call(srs=32, sps=16, ns=2) == lib.SPC_OK
    assert call(sps=-5, dps=3, planes=1) == lib.SPC_OK
    assert ffi.string(lib.spc_last_error()) == b""
    null = ffi.NULL
    assert lib.spc_copy_rows_planes(null, 0, 0, 0, null, null, 0, 0, 0, null, 0, 0, 0, 0) == lib.SPC_OK
    assert call(src=ffi.NULL, dst=ffi.NULL, planes=0) == lib.SPC_OK


def test_copy_rows_planes_negative_plane_stride():
    # Plane 0 starts at the second half of the buffer and plane 1 sits 64 bytes before it.
    nat = native.library()
    ffi, lib = nat.ffi, nat.lib
    src = torch.arange(2 * 4 * 4.0).view(2, 4, 4)
    dst = torch.zeros(2, 4, 4)
    si, di = torch.tensor([3, 0]), torch.tensor([1, 2])
    status = lib.spc_copy_rows_planes(ffi.cast("void *", src[1].data_ptr()), -64, 16, 4,
                                      ffi.cast("int64_t *", si.data_ptr()),
                                      ffi.cast("void *", dst[1].data_ptr()), -64, 16, 4,
                                      ffi.cast("int64_t *", di.data_ptr()), 2, 2, 16, 2)
    assert status == lib.SPC_OK, ffi.string(lib.spc_last_error())
    assert torch.equal(dst, native.reference_copy_rows_planes(src, si, torch.zeros(2, 4, 4), di))


# ---- loading -----------------------------------------------------------------------------


@pytest.fixture
def package_with_header(tmp_path):
    """A package directory with the header but no library."""
    (tmp_path / "include").mkdir()
    shutil.copy(native.library().header_path, tmp_path / "include" / "specontext.h")
    return tmp_path


def test_missing_library_names_both_places(package_with_header):
    bogus = package_with_header / "nowhere" / native.LIBRARY_NAME
    with pytest.raises(native.NativeLibraryError) as info:
        native.load_library(package_with_header, {native.LIBRARY_ENV_VAR: str(bogus)})
    message = str(info.value)
    assert "\n" not in message
    assert str(package_with_header / native.LIBRARY_NAME) in message and str(bogus) in message
    assert "pip install ." in message

    with pytest.raises(native.NativeLibraryError, match=f"\\${native.LIBRARY_ENV_VAR}: not set"):
        native.load_library(package_with_header, {})


def test_env_override_accepts_file_or_folder(package_with_header):
    real = native.library().path
    for value in (real, real.parent):
        loaded = native.load_library(package_with_header, {native.LIBRARY_ENV_VAR: str(value)})
        assert loaded.path == real and loaded.lib.spc_abi_version() == loaded.lib.SPC_ABI_VERSION


def test_stale_library_is_refused(package_with_header):
    header = package_with_header / "include" / "specontext.h"
    header.write_text(header.read_text().replace("SPC_ABI_VERSION = ", "SPC_ABI_VERSION = 1000 + "))
    with pytest.raises(native.NativeLibraryError, match="stale build"):
        native.load_library(package_with_header, {native.LIBRARY_ENV_VAR: str(native.library().path)})


def test_missing_header(tmp_path):
    with pytest.raises(native.NativeLibraryError, match="specontext.h not found"):
        native.load_library(tmp_path / "pkg", {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_unavailable_without_gpu():
    assert native.cuda_available() is False
    nat = native.library()
    ffi, lib = nat.ffi, nat.lib
    buf, idx = torch.zeros(4, 4), torch.tensor([0])
    p = ffi.cast("void *", buf.data_ptr())
    ip = ffi.cast("int64_t *", idx.data_ptr())
    status = lib.spc_cuda_gather_rows(p, 16, 4, ip, 1, p, 16, 16, ffi.NULL)
    assert status == lib.SPC_ERR_CUDA_UNAVAILABLE, ffi.string(lib.spc_last_error())
    for fn in (lib.spc_cuda_copy_rows_planes, lib.spc_cuda_memcpy_rows_planes):
        status = fn(p, 64, 16, 4, ip, p, 64, 16, 4, ip, 1, 1, 16, ffi.NULL)
        assert status == lib.SPC_ERR_CUDA_UNAVAILABLE, ffi.string(lib.spc_last_error())


# ---- CUDA path (run on a GPU machine) ---------------------------------------------------

# Row byte sizes chosen to hit every copy width: 1 (int8 x3), 2 (fp16 x1), 4 (fp32 x257),
# 8 (fp16 x4), 16 (fp16 x8 / bf16 x3x8).
CUDA_CASES = [(torch.int8, (3,)), (torch.float16, (1,)), (torch.float32, (257,)),
              (torch.float16, (4,)), (torch.float16, (8,)), (torch.bfloat16, (3, 8)),
              (torch.float32, (17,))]


@pytest.mark.cuda
@cuda
def test_cuda_available():
    assert native.cuda_available()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("src_on", ["device", "pinned"])
@pytest.mark.parametrize("dtype,row_shape", CUDA_CASES)
def test_cuda_gather_matches_reference(dtype, row_shape, src_on, gen):
    stream = torch.cuda.Stream()
    for n in NUM_ROWS:
        src = random_rows((n, *row_shape), dtype, generator=gen)
        src = src.cuda() if src_on == "device" else src.pin_memory()
        for m in num_selected(n):
            indices = torch.randint(0, n, (m,), generator=gen).cuda()
            stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the default stream
            with torch.cuda.stream(stream):
                out = native.gather_rows(src, indices)
            stream.synchronize()
            assert out.is_cuda and out.shape == (m, *row_shape)
            assert torch.equal(out.float().cpu(), native.reference_gather_rows(src, indices).cpu())


@pytest.mark.cuda
@cuda
def test_cuda_gather_misaligned_strided_rows(gen):
    # Offsets of 1 element break 16-byte alignment; the kernel must fall back to a narrower word.
    n, d = 1031, 24
    for offset in (0, 1, 2, 4):
        src_buffer = random_rows((n, d + 8), torch.float16, "cuda", gen)
        src = src_buffer[:, offset:offset + d]
        indices = torch.randint(0, n, (517,), generator=gen).cuda()
        out_buffer = torch.full((517, d + 8), -3.0, dtype=torch.float16, device="cuda")
        out = native.gather_rows(src, indices, out=out_buffer[:, offset:offset + d])
        torch.cuda.synchronize()
        assert torch.equal(out.float(), native.reference_gather_rows(src, indices))
        assert (out_buffer[:, :offset] == -3).all() and (out_buffer[:, offset + d:] == -3).all()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dst_on", ["device", "pinned"])
@pytest.mark.parametrize("dtype,row_shape", CUDA_CASES)
def test_cuda_scatter_matches_reference(dtype, row_shape, dst_on, gen):
    stream = torch.cuda.Stream()
    for n in NUM_ROWS:
        for m in (0, 1, n // 2 + 1, n):
            dst = random_rows((n, *row_shape), dtype, generator=gen)
            dst = dst.cuda() if dst_on == "device" else dst.pin_memory()
            src = random_rows((m, *row_shape), dtype, "cuda", gen)
            indices = torch.randperm(n, generator=gen)[:m].cuda()
            expected = native.reference_scatter_rows(src, indices, dst).cpu()
            stream.wait_stream(torch.cuda.current_stream())  # src, dst were made on the default stream
            with torch.cuda.stream(stream):
                native.scatter_rows(src, indices, dst)
            stream.synchronize()
            assert torch.equal(dst.float().cpu(), expected)


@pytest.mark.cuda
@cuda
def test_cuda_copy_runs_on_current_stream():
    # The stream first spins, then changes src; a copy on any other stream would run
    # during the spin and see the old values.
    stream = torch.cuda.Stream()
    src = torch.zeros(1031, 64, device="cuda")
    indices = torch.arange(1030, -1, -3, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
        src.add_(1)
        out = native.gather_rows(src, indices)
    stream.synchronize()
    assert (out == 1).all()


@pytest.mark.cuda
@cuda
def test_cuda_out_of_range_rows_are_skipped():
    src = torch.arange(15.0, device="cuda").view(5, 3)
    out = torch.full((3, 3), -1.0, device="cuda")
    native.gather_rows(src, torch.tensor([4, 5, -1], device="cuda"), out=out)
    torch.cuda.synchronize()
    assert out[0].tolist() == [12.0, 13.0, 14.0] and (out[1:] == -1).all()


@pytest.mark.cuda
@cuda
def test_cuda_rejects_pageable_host_memory():
    with pytest.raises(ValueError, match="pin_memory"):
        native.gather_rows(torch.zeros(5, 3), torch.tensor([1], device="cuda"))
    with pytest.raises(ValueError, match="pin_memory"):
        native.scatter_rows(torch.zeros(1, 3, device="cuda"), torch.tensor([1], device="cuda"),
                            torch.zeros(5, 3))


# Where src and dst live for the CUDA plane copies (never both pinned: with host indices that
# would be the host path).
PLACEMENTS = [("device", "device"), ("pinned", "device"), ("device", "pinned")]


def place(t: torch.Tensor, where: str) -> torch.Tensor:
    return t.cuda() if where == "device" else t.pin_memory()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["kernel", "memcpy"])
@pytest.mark.parametrize("src_on,dst_on", PLACEMENTS)
@pytest.mark.parametrize("dtype,row_shape", CUDA_CASES)
def test_cuda_copy_rows_planes_matches_reference(dtype, row_shape, src_on, dst_on, method, gen):
    stream = torch.cuda.Stream()
    for num_planes in (1, 2, 3):
        for num_src_rows, num_dst_rows in PLANE_NUM_ROWS:
            src_layouts = plane_layouts(num_planes, num_src_rows, row_shape, dtype, gen)
            dst_layouts = plane_layouts(num_planes, num_dst_rows, row_shape, dtype, gen)
            for (_, src_buffer, src_view), (_, dst_host, dst_view) in zip(src_layouts, dst_layouts):
                src = src_view(place(src_buffer, src_on))
                for pattern, src_indices, dst_indices in plane_index_patterns(num_src_rows, num_dst_rows, gen):
                    dst_buffer = place(dst_host, dst_on)
                    expected = dst_buffer.float().cpu().clone()  # no aliasing, whatever the dtype
                    dst_view(expected).copy_(native.reference_copy_rows_planes(
                        src, src_indices, dst_view(dst_buffer), dst_indices).cpu())
                    if method == "kernel":
                        src_indices, dst_indices = src_indices.cuda(), dst_indices.cuda()
                    stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the default stream
                    with torch.cuda.stream(stream):
                        native.copy_rows_planes(src, src_indices, dst_view(dst_buffer), dst_indices,
                                                method=method)
                    stream.synchronize()
                    assert torch.equal(dst_buffer.float().cpu(), expected), (num_planes, pattern)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["kernel", "memcpy"])
def test_cuda_copy_rows_planes_runs_on_current_stream(method):
    # As for gather: the stream spins, then changes src; a copy on any other stream would run
    # during the spin and see the old values.
    stream = torch.cuda.Stream()
    src = torch.zeros(2, 1031, 64).pin_memory()
    dst = torch.zeros(2, 517, 64, device="cuda")
    src_indices, dst_indices = torch.arange(1030, 0, -2), torch.arange(515)
    if method == "kernel":
        src_indices, dst_indices = src_indices.pin_memory(), dst_indices.cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
        dst.add_(1)
        native.copy_rows_planes(src, src_indices, dst, dst_indices, method=method)
    stream.synchronize()
    assert (dst[:, :515] == 0).all() and (dst[:, 515:] == 1).all()


@pytest.mark.cuda
@cuda
def test_cuda_copy_rows_planes_out_of_range():
    src = torch.arange(2 * 5 * 3.0, device="cuda").view(2, 5, 3)
    dst = torch.full((2, 4, 3), -1.0, device="cuda")
    # The kernel skips a copy whose src or dst row is out of range, in every plane.
    native.copy_rows_planes(src, torch.tensor([4, 5, 0, -1], device="cuda"), dst,
                            torch.tensor([0, 1, 4, 3], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 0], src[:, 4]) and (dst[:, 1:] == -1).all()
    # The memcpy loop checks on the host first and enqueues nothing.
    with pytest.raises(native.NativeError, match=r"dst_indices\[1\]=4 outside \[0, 4\)"):
        native.copy_rows_planes(src, torch.tensor([1, 2]), dst, torch.tensor([2, 4]), method="memcpy")
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 0], src[:, 4]) and (dst[:, 1:] == -1).all()


@pytest.mark.cuda
@cuda
def test_cuda_copy_rows_planes_placement_errors():
    src, dst = torch.zeros(2, 5, 3, device="cuda"), torch.zeros(2, 4, 3, device="cuda")
    idx = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="method='memcpy' reads src_indices on the host"):
        native.copy_rows_planes(src, idx.cuda(), dst, idx, method="memcpy")
    with pytest.raises(ValueError, match="pin_memory"):  # the kernel reads indices on the device
        native.copy_rows_planes(src, idx, dst, idx.cuda())
    with pytest.raises(ValueError, match="pin_memory"):
        native.copy_rows_planes(torch.zeros(2, 5, 3), idx, dst, idx, method="memcpy")
    # Device-memory indices reach the C memcpy loop only through cffi; it refuses them.
    nat = native.library()
    ffi, lib = nat.ffi, nat.lib
    dev_idx = idx.cuda()
    p_src, p_dst = ffi.cast("void *", src.data_ptr()), ffi.cast("void *", dst.data_ptr())
    ip = ffi.cast("int64_t *", dev_idx.data_ptr())
    status = lib.spc_cuda_memcpy_rows_planes(p_src, 60, 12, 5, ip, p_dst, 48, 12, 4, ip, 2, 2, 12, ffi.NULL)
    assert status == lib.SPC_ERR_INVALID_ARGUMENT
    assert "device memory" in ffi.string(lib.spc_last_error()).decode()


def test_loads_when_a_source_checkout_shadows_the_installed_package():
    """`python -c ...` from the repository root imports the source tree, which has no built
    library; the loader then uses the installed distribution's copy (CI once failed on this)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import specontext.native as n; print(n.library_path()); print(n.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in __import__("os").environ.items()
                              if k not in ("SPECONTEXT_NATIVE_LIB", "PYTHONPATH")})
    assert out.returncode == 0, out.stderr
    lib_path, module_path = out.stdout.split("\n")[:2]
    assert pathlib.Path(lib_path).is_file()
    if pathlib.Path(module_path).resolve().is_relative_to(root):
        assert not pathlib.Path(lib_path).resolve().is_relative_to(root / "specontext") or \
            (root / "specontext" / native.LIBRARY_NAME).exists()


def test_cuda_build_reports_what_was_compiled():
    build = native.cuda_build()
    if native.cuda_available():
        assert build is not None
    if build is not None:  # compiled with CUDA: a runtime version and real architectures
        assert build["cudart"] >= 11000 and all(50 <= a <= 1500 for a in build["archs"])
    else:
        assert not native.cuda_available()
