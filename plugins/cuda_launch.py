"""Loading and launching ahead-of-time compiled cubins (Triton's) with the CUDA
driver API, shared by the plugins whose kernels are compiled at build time.

Runtime side: imports only the standard library, cuda.bindings (lazily, at the
first launch) and fastertrt.errors, never triton or torch. A CompiledKernel is
self-describing (symbol, launch geometry, scratch sizes, argument layout), so a
TensorRT engine can carry it in a plugin field and launch it on another machine.
"""

from __future__ import annotations

import ctypes
import json
import struct
import threading
import zlib
from dataclasses import dataclass, field

from fastertrt.errors import FastertrtError

FORMAT_VERSION = 1
_MAGIC = b"FTKRN"           # one kernel: magic, version byte, u32 header length, JSON header, zlib(cubin)
_BUNDLE_MAGIC = b"FTKBN"    # several: magic, version byte, u32 count, then (u32 length, kernel bytes) each
_ELF_MAGIC = b"\x7fELF"
_DEFAULT_SHARED_LIMIT = 48 * 1024  # above this a kernel must opt in per function
_ARG_KINDS = {"ptr": ctypes.c_uint64, "i32": ctypes.c_int32, "f32": ctypes.c_float}


class KernelLaunchError(FastertrtError):
    """A compiled kernel cannot be decoded, loaded or launched here (no driver, no
    cubin for this GPU, arguments the cubin does not accept, or a CUDA error)."""


@dataclass(frozen=True)
class KernelArg:
    """One parameter of the cubin's entry, in order. divisibility: what the cubin
    was compiled to assume (bytes for pointers, a factor for ints; 0 = nothing)."""

    name: str
    kind: str  # "ptr" | "i32" | "f32"
    divisibility: int = 0


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    cubin: bytes
    cc: int
    num_warps: int
    shared: int
    block_m: int
    block_n: int
    global_scratch_size: int
    global_scratch_align: int
    profile_scratch_size: int
    profile_scratch_align: int
    args: tuple[KernelArg, ...]
    tags: dict = field(default_factory=dict, hash=False)
    # identity of the cubin for the per-context module cache (computed once)
    fingerprint: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "args", tuple(a if isinstance(a, KernelArg) else KernelArg(*a) for a in self.args))
        for a in self.args:
            if a.kind not in _ARG_KINDS:
                raise KernelLaunchError(f"kernel {self.name}: argument {a.name!r} has unknown kind {a.kind!r}")
        object.__setattr__(self, "fingerprint", zlib.crc32(self.cubin) ^ (len(self.cubin) << 32))

    @property
    def block_threads(self) -> int:
        return self.num_warps * 32  # the PTX's .reqntid: any other block size fails to launch

    def header(self) -> dict:
        return {
            "version": FORMAT_VERSION, "name": self.name, "cc": self.cc, "num_warps": self.num_warps,
            "shared": self.shared, "block_m": self.block_m, "block_n": self.block_n,
            "global_scratch": [self.global_scratch_size, self.global_scratch_align],
            "profile_scratch": [self.profile_scratch_size, self.profile_scratch_align],
            "args": [[a.name, a.kind, a.divisibility] for a in self.args],
            "tags": self.tags, "cubin_size": len(self.cubin), "cubin_crc32": zlib.crc32(self.cubin),
        }

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header(), separators=(",", ":"), sort_keys=True).encode()
        return _MAGIC + bytes([FORMAT_VERSION]) + struct.pack("<I", len(head)) + head + zlib.compress(self.cubin, 9)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledKernel:
        data = bytes(data)
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 5:
            raise KernelLaunchError("not a serialized fastertrt kernel (bad magic); was it written by "
                                    "CompiledKernel.to_bytes?")
        version = data[len(_MAGIC)]
        if version != FORMAT_VERSION:
            raise KernelLaunchError(f"serialized kernel format v{version}; this fastertrt reads v{FORMAT_VERSION}: "
                                    "rebuild the engine with this version")
        start = len(_MAGIC) + 5
        (head_len,) = struct.unpack_from("<I", data, len(_MAGIC) + 1)
        try:
            head = json.loads(data[start:start + head_len])
            cubin = zlib.decompress(data[start + head_len:])
        except (ValueError, zlib.error) as exc:
            raise KernelLaunchError(f"serialized kernel is corrupt: {exc}") from exc
        if len(cubin) != head["cubin_size"] or zlib.crc32(cubin) != head["cubin_crc32"]:
            raise KernelLaunchError(f"serialized kernel {head.get('name')!r}: cubin size or checksum mismatch")
        return cls(
            name=head["name"], cubin=cubin, cc=head["cc"], num_warps=head["num_warps"], shared=head["shared"],
            block_m=head["block_m"], block_n=head["block_n"],
            global_scratch_size=head["global_scratch"][0], global_scratch_align=head["global_scratch"][1],
            profile_scratch_size=head["profile_scratch"][0], profile_scratch_align=head["profile_scratch"][1],
            args=tuple(KernelArg(*a) for a in head["args"]), tags=head["tags"],
        )


def pack_kernels(kernels: dict[int, CompiledKernel]) -> bytes:
    """Several kernels (one per compute capability) as one blob, for one plugin field."""
    parts = [kernels[cc].to_bytes() for cc in sorted(kernels)]
    return (_BUNDLE_MAGIC + bytes([FORMAT_VERSION]) + struct.pack("<I", len(parts))
            + b"".join(struct.pack("<I", len(p)) + p for p in parts))


def unpack_kernels(data: bytes) -> dict[int, CompiledKernel]:
    data = bytes(data)
    if not data.startswith(_BUNDLE_MAGIC) or len(data) < len(_BUNDLE_MAGIC) + 5:
        raise KernelLaunchError("not a serialized fastertrt kernel bundle (bad magic)")
    if data[len(_BUNDLE_MAGIC)] != FORMAT_VERSION:
        raise KernelLaunchError(f"kernel bundle format v{data[len(_BUNDLE_MAGIC)]}; this fastertrt reads "
                                f"v{FORMAT_VERSION}: rebuild the engine with this version")
    pos = len(_BUNDLE_MAGIC) + 1
    (count,) = struct.unpack_from("<I", data, pos)
    pos += 4
    out = {}
    for _ in range(count):
        if pos + 4 > len(data):
            raise KernelLaunchError("kernel bundle is truncated")
        (n,) = struct.unpack_from("<I", data, pos)
        kernel = CompiledKernel.from_bytes(data[pos + 4:pos + 4 + n])
        out[kernel.cc] = kernel
        pos += 4 + n
    return out


# -----------------------------------------------------------------------------
# CUDA driver side
# -----------------------------------------------------------------------------
_DRIVER = None


def _driver():
    global _DRIVER
    if _DRIVER is None:
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise KernelLaunchError("launching plugin kernels needs cuda-python (cuda.bindings): "
                                    "pip install 'fastertrt[rtx]' or 'fastertrt[tensorrt]'") from exc
        _DRIVER = driver
    return _DRIVER


def _is_missing_driver(exc: BaseException) -> bool:
    # cuda.pathfinder's DynamicLibNotFoundError; matched by name so that an older
    # cuda-python without cuda.pathfinder still imports this module.
    return any(c.__name__ == "DynamicLibNotFoundError" for c in type(exc).__mro__)


def _call(result, what: str):
    """cuda.bindings calls return (CUresult, *values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            _, msg = _driver().cuGetErrorString(err)
            text = msg.decode() if isinstance(msg, bytes) else str(msg)
        except Exception:  # noqa: BLE001 - the name alone still says what failed
            text = "no description"
        raise KernelLaunchError(f"{what} failed: {getattr(err, 'name', err)} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def driver_call(fn_name: str, *args):
    """Call cuda.bindings.driver.<fn_name>(*args), raising KernelLaunchError on failure
    and on a missing NVIDIA driver."""
    drv = _driver()
    try:
        return _call(getattr(drv, fn_name)(*args), fn_name)
    except KernelLaunchError:
        raise
    except Exception as exc:  # noqa: BLE001 - see _is_missing_driver
        if _is_missing_driver(exc):
            raise KernelLaunchError("no NVIDIA driver on this machine (libcuda cannot be loaded): plugin "
                                    "kernels need an NVIDIA GPU with its driver") from exc
        raise


_init_lock = threading.Lock()
_initialized = False


def ensure_context() -> int:
    """The current CUDA context as an int (TensorRT's and torch's enqueue threads have
    one); where none is current, device 0's primary context is made current."""
    global _initialized
    if not _initialized:
        with _init_lock:
            if not _initialized:
                driver_call("cuInit", 0)
                _initialized = True
    ctx = driver_call("cuCtxGetCurrent")
    if int(ctx) == 0:
        dev = driver_call("cuDeviceGet", 0)
        ctx = driver_call("cuDevicePrimaryCtxRetain", dev)
        driver_call("cuCtxSetCurrent", ctx)
    return int(ctx)


_cc_cache: dict[int, int] = {}


def current_compute_capability() -> int:
    """Compute capability of the current context's device as an int (86, 90, ...)."""
    ctx = ensure_context()
    cc = _cc_cache.get(ctx)
    if cc is None:
        drv = _driver()
        dev = driver_call("cuCtxGetDevice")
        attr = drv.CUdevice_attribute
        major = driver_call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        minor = driver_call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        cc = _cc_cache[ctx] = int(major) * 10 + int(minor)
    return cc


_sm_cache: dict[int, int] = {}


def multiprocessor_count() -> int:
    """Streaming multiprocessors of the current context's device."""
    ctx = ensure_context()
    n = _sm_cache.get(ctx)
    if n is None:
        dev = driver_call("cuCtxGetDevice")
        attr = _driver().CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        n = _sm_cache[ctx] = int(driver_call("cuDeviceGetAttribute", attr, dev))
    return n


def select_kernel(kernel_by_cc: dict[int, CompiledKernel], cc: int, what: str = "kernel") -> CompiledKernel:
    """The cubin for compute capability `cc`. Only an exact match is taken: sm_90
    cubins are sm_90a (Hopper only), and a cubin for a lower minor version would run
    but is not what was tuned; the error names what the engine carries."""
    kernel = kernel_by_cc.get(int(cc))
    if kernel is None:
        have = ", ".join(f"sm_{c}" for c in sorted(kernel_by_cc)) or "none"
        raise KernelLaunchError(f"no {what} cubin for this GPU (sm_{cc}); compiled for: {have}. Rebuild "
                                f"with sm_{cc} among the kernel targets.")
    return kernel


_modules: dict[tuple[int, str, int], object] = {}
_modules_lock = threading.Lock()


def get_function(kernel: CompiledKernel, ctx: int):
    """CUfunction for `kernel` in context `ctx`, loading the module once per (context, cubin)."""
    key = (ctx, kernel.name, kernel.fingerprint)
    fn = _modules.get(key)
    if fn is not None:
        return fn
    with _modules_lock:
        fn = _modules.get(key)
        if fn is None:
            fn = _load(kernel)
            _modules[key] = fn
    return fn


def _load(kernel: CompiledKernel):
    drv = _driver()
    module = driver_call("cuModuleLoadData", kernel.cubin)
    fn = driver_call("cuModuleGetFunction", module, kernel.name.encode())
    if kernel.shared > _DEFAULT_SHARED_LIMIT:
        driver_call("cuFuncSetAttribute", fn,
                    drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared)
    return fn


def check_args(kernel: CompiledKernel, values: dict) -> None:
    """Every argument the cubin takes is given, and satisfies the divisibility it was
    compiled to assume (a violated hint gives misaligned vector loads: wrong results
    or a fault, not an error)."""
    missing = [a.name for a in kernel.args if a.name not in values]
    if missing:
        raise KernelLaunchError(f"kernel {kernel.tags.get('kernel', kernel.name)}: missing argument(s) {missing}")
    _check_values(kernel, [values[a.name] for a in kernel.args])


def _check_values(kernel: CompiledKernel, args: list) -> None:
    for a, v in zip(kernel.args, args):
        if a.divisibility and a.kind in ("ptr", "i32") and int(v) % a.divisibility:
            unit = "bytes" if a.kind == "ptr" else "elements"
            raise KernelLaunchError(
                f"kernel {kernel.tags.get('variant', kernel.name)}: argument {a.name}={int(v)} is not a "
                f"multiple of {a.divisibility} {unit}, which the cubin assumes (contiguous tensors, "
                f"head size a multiple of 16)")
        if a.kind == "i32" and not -2**31 <= int(v) < 2**31:
            raise KernelLaunchError(f"kernel argument {a.name}={int(v)} does not fit int32")


class _Plan:
    """What one kernel needs at every launch in one context, made once per thread:
    the function, one ctypes cell per argument and the array of their addresses.
    A TensorRT plugin's enqueue runs this on every call, so the per-call work is
    writing the values and checking the few hints the cubin assumed."""

    def __init__(self, kernel: CompiledKernel, ctx: int):
        self.fn = get_function(kernel, ctx)
        self.index = {a.name: i for i, a in enumerate(kernel.args)}
        self.cells = [_ARG_KINDS[a.kind]() for a in kernel.args] + [ctypes.c_uint64(0), ctypes.c_uint64(0)]
        self.params = (ctypes.c_void_p * len(self.cells))(*[ctypes.addressof(c) for c in self.cells])
        self.params_addr = ctypes.addressof(self.params)
        self.hinted = [(i, a.divisibility) for i, a in enumerate(kernel.args)
                       if a.divisibility and a.kind in ("ptr", "i32")]
        self.ints = [i for i, a in enumerate(kernel.args) if a.kind == "i32"]
        self.scratch = kernel.global_scratch_size > 0 or kernel.profile_scratch_size > 0


_plans = threading.local()


def _plan(kernel: CompiledKernel, ctx: int) -> _Plan:
    cache = getattr(_plans, "cache", None)
    if cache is None:
        cache = _plans.cache = {}
    key = (ctx, kernel.fingerprint, kernel.name)
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = _Plan(kernel, ctx)
    return plan


def launch(kernel: CompiledKernel, grid: tuple[int, int, int], values: dict, stream: int) -> None:
    """Launch `kernel` on `stream` (an int CUstream handle; 0 = legacy default stream)
    with arguments by name, plus Triton's two trailing scratch pointers."""
    ctx = ensure_context()
    plan = _plan(kernel, ctx)
    try:
        args = [values[a.name] for a in kernel.args]
    except KeyError:
        check_args(kernel, values)  # names what is missing
        raise
    for i, div in plan.hinted:
        if int(args[i]) % div:
            _check_values(kernel, args)  # raises with the argument's name
    for i in plan.ints:
        if not -2**31 <= args[i] < 2**31:
            _check_values(kernel, args)
    for cell, v in zip(plan.cells, args):
        cell.value = v
    drv = _driver()
    hstream = drv.CUstream(int(stream))
    scratch = (0, 0)
    if plan.scratch:
        scratch = (_scratch(kernel.global_scratch_size, kernel.global_scratch_align, grid, hstream),
                   _scratch(kernel.profile_scratch_size, kernel.profile_scratch_align, grid, hstream))
    plan.cells[-2].value, plan.cells[-1].value = scratch
    try:
        result = drv.cuLaunchKernel(plan.fn, int(grid[0]), int(grid[1]), int(grid[2]), kernel.block_threads, 1, 1,
                                    kernel.shared, hstream, plan.params_addr, 0)
        if int(result[0]) != 0:
            _call(result, "cuLaunchKernel")
    finally:
        for p in scratch:
            if p:
                # stream-ordered: freed after the kernel is done with it
                driver_call("cuMemFreeAsync", drv.CUdeviceptr(p), hstream)


def _scratch(size: int, align: int, grid, hstream) -> int:
    """Triton sizes scratch per program; 0 (a null pointer) where the kernel needs none.
    Stream-ordered allocations are at least 256-byte aligned, all Triton asks for."""
    if size <= 0:
        return 0
    if align > 256:
        raise KernelLaunchError(f"kernel asks for {align}-byte aligned scratch; the launcher gives 256")
    programs = int(grid[0]) * int(grid[1]) * int(grid[2])
    return int(driver_call("cuMemAllocAsync", size * programs, hstream))
