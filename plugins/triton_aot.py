"""Triton plumbing the plugins' kernels.py files share: importing triton, jitting a
kernel for compiling or for the interpreter, the ASTSource signature and the
cubin's argument layout, triton.compile to a cuda_launch.CompiledKernel, and the
per-process compile cache with its pool of compile processes.

Importing this module does not import triton (each function imports it), so a
plugin's build side can name its variants without triton installed; the runtime
never imports it.
"""

from __future__ import annotations

import os

from fastertrt.plugins.cuda_launch import CompiledKernel, KernelArg

# ASTSource's spelling of the I/O types the plugins take.
TRITON_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# Dynamic shared memory a block may opt in to, per compute capability (KB).
SHARED_LIMIT_KB = {75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}


def import_triton(what: str):
    """triton (with triton.language loaded), or a MissingDependencyError saying
    that `what` needs it."""
    try:
        import triton
        import triton.language  # noqa: F401 - the kernels' module-global `tl`
    except ImportError as exc:
        from fastertrt.errors import MissingDependencyError

        raise MissingDependencyError(f"compiling or interpreting {what} needs triton: "
                                     "pip install 'fastertrt[kernels]'") from exc
    return triton


def jit_for_compile(triton, fn, what: str):
    """triton.jit(fn) for triton.compile, which fails once TRITON_INTERPRET=1 was
    set before triton's import: say so instead of Triton's own error."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set in this process; triton.compile does not work in "
                           f"interpreter mode. Compile {what} in a process without it.")
    return triton.jit(fn)


def jit_for_interpreter(triton, fn, entry: str):
    """triton.jit(fn) for a CPU run; `entry` is the public function that needs it."""
    if not triton.knobs.runtime.interpret:
        raise RuntimeError(f"{entry} needs TRITON_INTERPRET=1 in the environment before triton "
                           "is imported (run it in a separate process; triton.compile does not work there)")
    return triton.jit(fn)


def signature_and_layout(fn, types: dict, constexprs: dict, divisibility=None):
    """ASTSource signature, constexprs and attrs, and the cubin's argument layout, in
    `fn`'s parameter order. divisibility(name, type) is the alignment hint (bytes for
    pointers, elements for integers) the cubin may assume for an argument, 0 for none;
    the launcher checks the hints on every call."""
    arg_names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    signature, attrs, layout = {}, {}, []
    for i, name in enumerate(arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        div = divisibility(name, types[name]) if divisibility else 0
        if div:
            attrs[(i,)] = [["tt.divisibility", div]]
        kind = "ptr" if types[name].startswith("*") else ("f32" if types[name] == "fp32" else "i32")
        layout.append(KernelArg(name, kind, div))
    return signature, constexprs, attrs, tuple(layout)


def compile_to_kernel(triton, kernel, signature, constexprs, attrs, layout, cc: int, *, num_warps: int,
                      num_stages: int, block_m: int, block_n: int, tags: dict, label: str, hint: str = "",
                      maxnreg: int | None = None) -> CompiledKernel:
    """triton.compile one jitted kernel for sm_`cc` (no GPU needed) into the
    CompiledKernel the launchers take. `label` names the kernel in the error when it
    needs more shared memory than sm_`cc` gives a block; `hint` ends that error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if maxnreg:
        options["maxnreg"] = maxnreg
    with triton.knobs.compilation.scope():
        # Line info would be most of the cubin, and the cubin goes into every engine (twice).
        triton.knobs.compilation.disable_line_info = True
        compiled = triton.compile(src, target=GPUTarget("cuda", int(cc), 32), options=options)
    meta = compiled.metadata
    limit = SHARED_LIMIT_KB.get(int(cc), 48) * 1024
    if meta.shared > limit:
        raise ValueError(f"{label} needs {meta.shared} bytes of shared memory on sm_{cc}, over its {limit}{hint}")
    return CompiledKernel(
        name=compiled.name,
        cubin=bytes(compiled.kernel),
        cc=int(cc),
        num_warps=int(meta.num_warps),
        shared=int(meta.shared),
        block_m=block_m,
        block_n=block_n,
        global_scratch_size=int(getattr(meta, "global_scratch_size", 0) or 0),
        global_scratch_align=int(getattr(meta, "global_scratch_align", 1) or 1),
        profile_scratch_size=int(getattr(meta, "profile_scratch_size", 0) or 0),
        profile_scratch_align=int(getattr(meta, "profile_scratch_align", 1) or 1),
        args=layout,
        tags={"kernel": kernel.fn.__name__, **tags, "triton": triton.__version__},
    )


def cached_compile(cache: dict, compile_fn, variant, cc: int) -> CompiledKernel:
    """compile_fn(variant, cc), once per process: `cache` is the kernels module's own."""
    key = (variant, int(cc))
    if key not in cache:
        cache[key] = compile_fn(variant, int(cc))
    return cache[key]


def _compile_job(compile_fn, key):
    return key, compile_fn(*key)


def compile_all(cache: dict, compile_fn, pairs, jobs: int | None = None) -> None:
    """Fill `cache` for (variant, cc) pairs, in up to `jobs` worker processes (default:
    the CPU count): Triton's compile is single-threaded and mostly holds the GIL.
    compile_fn must be a module-level function: the workers receive it by name."""
    import functools

    pairs = [(v, int(cc)) for v, cc in pairs]
    todo = [p for p in dict.fromkeys(pairs) if p not in cache]
    jobs = min(jobs or os.cpu_count() or 1, len(todo))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that holds torch/triton threads can deadlock
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            cache.update(pool.map(functools.partial(_compile_job, compile_fn), todo))
    for variant, cc in todo:
        cached_compile(cache, compile_fn, variant, cc)
