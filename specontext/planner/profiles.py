"""Device profiles: memory, bandwidth and the unified-memory flag, from a shipped file or detection.

Shipped profiles live in ``profiles/`` (installed as ``specontext/profiles``), one JSON file per
device with the source of its numbers. ``--device-profile`` takes ``auto`` (detect this
machine), a shipped NAME, or a FILE.

Detection: NVML (pynvml) for discrete GPUs: memory, memory bandwidth from the maximum memory
clock and bus width, host link from the PCIe generation and width. Jetson has no NVML; it is
recognised from its device tree and matched to a shipped Jetson profile, with psutil's memory
total. With no GPU, the compute memory is host RAM (psutil). Host memory is capped by the
container's cgroup limit where one is set (:func:`host_memory_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from ..config import read_json_object
from ..errors import InputError, ModelFileError, malformed

GIB = 2**30
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("cuda", "cpu")


@dataclass(frozen=True)
class DeviceProfile:
    """One device. Sizes in GiB, bandwidths in GB/s (10^9 bytes per second), as datasheets give them.

    Attributes:
        name, description, source: what it is and where each number comes from.
        kind: ``cuda`` or ``cpu`` (where compute runs).
        unified_memory: CPU and GPU share one DRAM pool (Jetson; a CPU-only machine): offload
            then adds no capacity, and the host budget is the device budget.
        device_memory_gib, host_memory_gib: total memory of each tier.
        reserved_device_gib, reserved_host_gib: kept free (OS, CUDA context, allocator slack).
        memory_bandwidth_gb_s: compute memory read bandwidth; host_link_gb_s: host <-> device.
    """

    name: str
    description: str
    kind: str
    unified_memory: bool
    device_memory_gib: float
    host_memory_gib: float
    reserved_device_gib: float
    reserved_host_gib: float
    memory_bandwidth_gb_s: float
    host_link_gb_s: float
    source: str

    def __post_init__(self) -> None:
        _validate(asdict(self), self.name or "profile")

    @property
    def device_budget_bytes(self) -> int:
        return int((self.device_memory_gib - self.reserved_device_gib) * GIB)

    @property
    def host_budget_bytes(self) -> int:
        if self.unified_memory:
            return self.device_budget_bytes
        return int((self.host_memory_gib - self.reserved_host_gib) * GIB)

    def to_dict(self) -> dict:
        return asdict(self)


_TYPES = {f.name: f.type for f in fields(DeviceProfile)}


def _validate(data: dict, where: str) -> None:
    """Raise InputError naming the first missing, unknown or bad field."""
    for name in _TYPES:
        if name not in data:
            raise InputError(f"device profile {where}: missing field {name!r}")
    for name in data:
        if name not in _TYPES:
            raise InputError(f"device profile {where}: unknown field {name!r} (fields: {', '.join(_TYPES)})")
    for name, typ in _TYPES.items():
        value = data[name]
        if typ == "str":
            if not isinstance(value, str) or (name in ("name", "kind") and not value):
                raise InputError(f"device profile {where}: field {name!r} must be a non-empty string, got {value!r}")
        elif typ == "bool":
            if not isinstance(value, bool):
                raise InputError(f"device profile {where}: field {name!r} must be true or false, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise InputError(f"device profile {where}: field {name!r} must be a number >= 0, got {value!r}")
    if data["kind"] not in KINDS:
        raise InputError(f"device profile {where}: field 'kind' must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    for name in ("device_memory_gib", "memory_bandwidth_gb_s", "host_link_gb_s"):
        if data[name] <= 0:
            raise InputError(f"device profile {where}: field {name!r} must be > 0, got {data[name]!r}")
    if data["reserved_device_gib"] >= data["device_memory_gib"]:
        raise InputError(f"device profile {where}: field 'reserved_device_gib' ({data['reserved_device_gib']}) must be "
                         f"less than device_memory_gib ({data['device_memory_gib']})")
    if not data["unified_memory"] and data["reserved_host_gib"] >= data["host_memory_gib"]:
        raise InputError(f"device profile {where}: field 'reserved_host_gib' ({data['reserved_host_gib']}) must be "
                         f"less than host_memory_gib ({data['host_memory_gib']})")


def profile_dirs() -> list[str]:
    return [os.path.join(_PACKAGE_DIR, "profiles"), os.path.join(os.path.dirname(_PACKAGE_DIR), "profiles")]


def shipped_profiles() -> dict[str, str]:
    """NAME -> path of every shipped profile."""
    out: dict[str, str] = {}
    for d in profile_dirs():
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                if f.endswith(".json"):
                    out.setdefault(f[:-5], os.path.join(d, f))
    return out


@malformed("the device profile", InputError)
def read_profile(path: str) -> DeviceProfile:
    """A profile from a JSON file; InputError names the file and the bad field."""
    try:
        data = read_json_object(path, missing=f"device profile file not found: {path}")
    except ModelFileError as exc:  # a profile is user input, not a model file
        raise InputError(str(exc)) from None
    _validate(data, path)
    return DeviceProfile(**data)


def load_profile(spec: str) -> DeviceProfile:
    """``auto`` (detect), a shipped NAME, or a FILE path."""
    if spec == "auto":
        return detect_profile()
    shipped = shipped_profiles()
    if spec in shipped:
        return read_profile(shipped[spec])
    if os.path.sep in spec or spec.endswith(".json") or os.path.exists(spec):
        return read_profile(spec)
    raise InputError(f"unknown device profile {spec!r}: use auto, a JSON file, or one of {', '.join(shipped)}")


def _jetson_model() -> str | None:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                model = f.read().strip("\x00\n ")
        except OSError:
            continue
        if "jetson" in model.lower() or "orin" in model.lower():
            return model
    return None


_PCIE_GB_S_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def cgroup_memory_limit(root: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(limit, in use) in bytes from this process's cgroup v2 memory controller, or None where no
    limit is set or readable. psutil reads /proc/meminfo, which shows the whole node's memory
    inside a container."""
    try:
        with open(os.path.join(root, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        with open(os.path.join(root, "memory.current"), encoding="ascii") as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else (int(limit), current)


def address_space_limit() -> tuple[int, int] | None:
    """This process's address-space limit (``ulimit -v``, RLIMIT_AS) and the address space it holds
    now, or None when unlimited (always so on platforms without it)."""
    try:
        import resource

        import psutil

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        return int(limit), int(psutil.Process().memory_info().vms)
    except (ImportError, OSError, ValueError, AttributeError):
        return None


def host_memory_bytes(available: bool = False) -> int:
    """This machine's host memory (``available``: what is free now), within a container's limit and
    this process's address-space limit."""
    import psutil

    vm = psutil.virtual_memory()
    value = vm.available if available else vm.total
    for capped in (cgroup_memory_limit(), address_space_limit()):
        if capped is not None:
            limit, current = capped
            value = min(value, limit - current if available else limit)
    return max(int(value), 0)


def detect_profile(gpu_index: int = 0) -> DeviceProfile:
    """This machine's profile: NVML for a discrete GPU, the device tree for Jetson, else the CPU."""
    host_gib = host_memory_bytes() / GIB
    jetson = _jetson_model()
    if jetson is not None:
        shipped = shipped_profiles()
        key = "agx" if "agx" in jetson.lower() else "nx" if " nx" in jetson.lower() else "nano"
        match = [n for n in shipped if n.startswith("jetson") and key in n]
        if not match:
            raise InputError(f"detected {jetson!r} but no shipped Jetson profile matches; pass --device-profile FILE")
        base = read_profile(shipped[match[0]])
        return DeviceProfile(**{**base.to_dict(), "name": f"detected-{base.name}", "device_memory_gib": host_gib,
                                "host_memory_gib": host_gib,
                                "source": f"detected {jetson} (device tree); memory from psutil; bandwidth: {base.source}"})
    gpu = _nvml_gpu(gpu_index)
    if gpu is not None:
        name, mem_gib, bw, link = gpu
        return DeviceProfile(name="detected-gpu", description=name, kind="cuda", unified_memory=False,
                             device_memory_gib=round(mem_gib, 3), host_memory_gib=round(host_gib, 3),
                             reserved_device_gib=round(max(0.5, 0.02 * mem_gib), 3),
                             reserved_host_gib=round(min(4.0, 0.25 * host_gib), 3),
                             memory_bandwidth_gb_s=round(bw, 1), host_link_gb_s=round(link, 2),
                             source="detected with NVML (memory, max memory clock x bus width, PCIe link) and psutil")
    base = read_profile(shipped_profiles()["cpu"])
    return DeviceProfile(**{**base.to_dict(), "name": "detected-cpu", "device_memory_gib": round(host_gib, 3),
                            "host_memory_gib": round(host_gib, 3),
                            "reserved_device_gib": round(min(2.0, 0.25 * host_gib), 3),
                            "source": f"RAM from psutil; bandwidth assumed as in the shipped cpu profile"})


def _nvml_gpu(index: int) -> tuple[str, float, float, float] | None:
    """(name, memory GiB, memory GB/s, host link GB/s) of GPU ``index``, or None without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if index >= pynvml.nvmlDeviceGetCount():
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / GIB
        # double data rate: bytes/s = 2 * memory clock * bus width / 8 (gives 3.35 TB/s for H100 SXM)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        bw = 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9
        gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
        link = _PCIE_GB_S_PER_LANE.get(gen, 1.969) * width
        return name, mem, bw, link
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
