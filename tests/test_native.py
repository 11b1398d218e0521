"""Native row gather/scatter against the pure-torch float32 reference.

Shape letters: N rows of the indexed buffer, M selected rows, *R row shape.
"""

from __future__ import annotations

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
    status = lib.spc_cuda_gather_rows(p, 16, 4, ffi.cast("int64_t *", idx.data_ptr()), 1, p, 16, 16, ffi.NULL)
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


# ---- plane copy (elastic KV loading: one row list through every layer's K and V) ------------


def _plane_case(planes, n_src, n_dst, m, row_shape, dtype, gen, strided=False):
    src = random_rows((planes, n_src, *row_shape), dtype, generator=gen)
    dst = random_rows((planes + 1 if strided else planes, n_dst + 3, *row_shape), dtype, generator=gen)
    if strided:  # every other plane of a padded buffer, rows of a wider allocation
        dst = dst[:planes, 1:n_dst + 1]
    src_idx = torch.randint(0, n_src, (m,), generator=gen)
    dst_idx = torch.randperm(n_dst, generator=gen)[:m].contiguous()
    return src, src_idx, dst, dst_idx


@pytest.mark.parametrize("num_threads", THREADS)
@pytest.mark.parametrize("row_shape", [(1,), (7,), (64,), (3, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [1, 3, 7])
def test_copy_rows_planes_matches_reference(planes, dtype, row_shape, num_threads, gen):
    for n_src, n_dst, m in ((5, 5, 0), (5, 9, 1), (1031, 257, 200), (33, 600, 33)):
        for strided in (False, True):
            src, si, dst, di = _plane_case(planes, n_src, n_dst, m, row_shape, dtype, gen, strided)
            expected = native.reference_copy_rows_planes(src, si, dst, di)
            out = native.copy_rows_planes(src, si, dst, di, num_threads=num_threads)
            assert out is dst and torch.equal(dst.float(), expected)


def test_copy_rows_planes_of_a_kv_layout(gen):
    """The offload layout: host [L, 2, B, G, S, D] -> slots [L, 2, B, G, P, D], rows r * S + pos."""
    L, B, G, S, D, P = 2, 2, 3, 40, 5, 8
    host = torch.randn(L, 2, B, G, S, D, generator=gen)
    slots = torch.zeros(L, 2, B, G, P, D)
    r = torch.tensor([0, 1, 5, 5])
    pos, slot = torch.tensor([3, 39, 0, 7]), torch.tensor([0, 7, 2, 3])
    for layer in range(L):
        native.copy_rows_planes(host[layer].view(2, -1, D), r * S + pos, slots[layer].view(2, -1, D), r * P + slot)
    for layer in range(L):
        for kv in range(2):
            flat_h, flat_s = host[layer, kv].reshape(-1, S, D), slots[layer, kv].reshape(-1, P, D)
            for ri, p, s in zip(r.tolist(), pos.tolist(), slot.tolist()):
                assert torch.equal(flat_s[ri, s], flat_h[ri, p])
    assert int((slots.abs().sum(-1) > 0).sum()) == L * 2 * 4  # nothing else written


@pytest.mark.parametrize("side", ["src", "dst"])
def test_copy_rows_planes_bad_index_leaves_dst_untouched(side, gen):
    src, si, dst, di = _plane_case(3, 10, 10, 4, (4,), torch.float32, gen)
    bad = (src if side == "src" else dst).shape[1]
    (si if side == "src" else di)[2] = bad
    before = dst.clone()
    with pytest.raises(native.NativeError, match=f"{side}_indices\\[2\\]={bad} outside"):
        native.copy_rows_planes(src, si, dst, di)
    assert torch.equal(dst, before)


def test_copy_rows_planes_bad_arguments():
    src, dst = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="same length"):
        native.copy_rows_planes(src, idx, dst, idx[:1])
    with pytest.raises(ValueError, match="dst must be"):
        native.copy_rows_planes(src, idx, torch.zeros(3, 4, 3), idx)
    with pytest.raises(ValueError, match="dst must be"):
        native.copy_rows_planes(src, idx, dst.double(), idx)
    with pytest.raises(ValueError, match="int64"):
        native.copy_rows_planes(src, idx.int(), dst, idx)
    with pytest.raises(ValueError, match="planes overlap"):
        native.copy_rows_planes(torch.zeros(4, 3).expand(2, 4, 3), idx, dst, idx)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype,row_shape", CUDA_CASES)
def test_cuda_copy_rows_planes_pinned_host_to_device_skips_minus_one(dtype, row_shape, gen):
    stream = torch.cuda.Stream()
    for planes, n_src, n_dst, m in ((1, 5, 5, 3), (7, 1031, 257, 200)):
        src, si, dst, di = _plane_case(planes, n_src, n_dst, m, row_shape, dtype, gen)
        si[::3] = -1  # "nothing to fetch" entries
        expected = native.reference_copy_rows_planes(src, si, dst, di)
        src, dst = src.pin_memory(), dst.cuda()
        si, di = si.cuda(), di.cuda()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            native.copy_rows_planes(src, si, dst, di)
        stream.synchronize()
        assert torch.equal(dst.float().cpu(), expected)
