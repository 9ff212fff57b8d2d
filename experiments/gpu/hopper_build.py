"""The graphs engine's decode kernels, and the variants that wait for a GPU, as Triton builds them for an H200
(sm_90), on a machine without one.

Triton's NVIDIA backend, ptxas included, comes with the Triton wheel, so the whole build (Triton IR, PTX, the
cubin) runs on the CPU; only running a kernel needs the card. Each kernel here is launched by the engine's own
code at the shapes of TinyLLaVA-3.2B's decode step (Phi-2: hidden 2560, 32 heads of 80, MLP 10240; 8192
tokens cached; the 0.5 hybrid's Mamba-2 step), but the launch builds instead of running: with the arguments
it was given, specialised as Triton's launcher specialises them (pointer alignment, integers divisible by
16), and with programmatic dependent launch on, as on Hopper. What it reports: registers, shared memory, how
many programs fit on an SM, the load instructions in the SASS, and where PDL's wait falls.

    python experiments/gpu/hopper_build.py [--json PATH]

Run it without TRITON_INTERPRET (the interpreter replaces the kernels it builds). tests/test_hopper_build.py
checks the report; docs/bench-h200.md (session 20) says what it found. Triton's version matters: the GPU
machine has 3.6, the suite 3.9; both build these kernels alike. The specialisation goes through the launcher's
own internals (`create_function_from_signature`, `JITFunction._pack_args`, as in Triton 3.6 to 3.9), so a newer
Triton may need this file adjusted before the kernels do.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# An sm_90 SM: 64K 32-bit registers, allocated per warp in units of 256; 228 KB of shared memory, of which the
# driver keeps 1 KB per resident block; 2048 threads; 32 blocks.
REGISTERS, REGISTER_UNIT, SHARED_BYTES, SHARED_PER_BLOCK, THREADS, BLOCKS = 65536, 256, 228 * 1024, 1024, 2048, 32
H200_SMS = 132
HIDDEN, HEADS, HEAD_DIM, FFN, SLOTS = 2560, 32, 80, 10240, 8448  # 8192 prompt tokens and room to decode


@dataclass
class Build:
    """One kernel as built for sm_90, and the grid it was launched on."""

    kernel: str
    grid: list[int]
    constants: dict  # the launch's constexpr arguments (tiles, flags)
    warps: int
    registers: int  # per thread
    local: int  # bytes of local memory a thread: registers spilled (0 for every kernel here)
    shared: int  # bytes per program, as Triton allocates it
    loads: dict[str, int]  # SASS opcodes that read global memory, and how many of each
    wait: int  # offsets in the PTX of PDL's wait, the first global read (a load or cp.async), PDL's trigger (-1: none)
    first_load: int
    trigger: int
    programs_per_sm: int = field(init=False)
    widest_load: int = field(init=False)  # bytes a thread, into registers (LDG); 0 if none
    widest_copy: int = field(init=False)  # bytes a thread, into shared memory (LDGSTS: cp.async, a pipelined loop's)

    def __post_init__(self):
        self.widest_load, self.widest_copy = (widest(self.loads, into_shared) for into_shared in (False, True))
        # the least of what registers, shared memory, threads and the block limit allow
        warp_registers = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        self.programs_per_sm = min(REGISTERS // (warp_registers * self.warps), SHARED_BYTES // (self.shared + SHARED_PER_BLOCK),
                                   THREADS // (32 * self.warps), BLOCKS)


class Builder:
    """Stands where a kernel stood: `builder[grid](*args, **kwargs)` builds it for sm_90 and records the build."""

    def __init__(self, kernel, builds: list[Build]):
        self.kernel, self.builds = kernel, builds

    def __getitem__(self, grid):
        def build(*args, **kwargs):
            kwargs.pop("launch_pdl", None)
            if "USE_PDL" in kwargs:
                kwargs["USE_PDL"] = True
            backend = make_backend(HOPPER)
            binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constants, attrs = self.kernel._pack_args(backend, kwargs, bound, specialization, options)
            built = compile(ASTSource(self.kernel, signature, constants, attrs), target=HOPPER, options=options.__dict__)
            ptx, usage, sass = built.asm["ptx"], cuobjdump(built.asm["cubin"], "--dump-resource-usage"), cuobjdump(built.asm["cubin"], "-sass")
            registers, local = (int(re.search(rf"{name}:(\d+)", usage).group(1)) for name in ("REG", "LOCAL"))
            loads = collections.Counter(re.findall(r"\b(LDGSTS(?:\.\w+)*|LDG(?:\.\w+)+)", sass))
            self.builds.append(Build(
                self.kernel.__name__, list(grid), {k: v for k, v in kwargs.items() if k.isupper()}, built.metadata.num_warps,
                registers, local, built.metadata.shared, dict(loads),
                ptx.find("griddepcontrol.wait"), first(ptx, "ld.global", "cp.async"), ptx.find("griddepcontrol.launch_dependents"),
            ))

        return build


def first(text: str, *words: str) -> int:
    """Where the first of `words` appears in `text`; -1 if none does."""
    found = [at for at in (text.find(word) for word in words) if at >= 0]
    return min(found, default=-1)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([CUOBJDUMP, flag, path], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def building(module, *names: str):
    """Within: launches of `module.NAME`, for each of `names`, build instead of running; yields the list the
    builds go to, in launch order."""
    builds: list[Build] = []
    kernels = {name: getattr(module, name) for name in names}
    for name, kernel in kernels.items():
        setattr(module, name, Builder(kernel, builds))
    try:
        yield builds
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype)  # never read: a build needs only shapes, dtypes and alignment


# The teacher step's three products, as the engine launches them: the merged q/k/v+fc1 with its folded layer
# norm and fc1's GELU, dense, and fc2 adding the residual stream.
PRODUCTS = {
    "merged": (3 * HIDDEN + FFN, HIDDEN, dict(gelu_start=3 * HIDDEN, gelu_end=3 * HIDDEN + FFN, norm_scale=empty(HIDDEN, dtype=torch.float32),
                                              norm_row_sums=empty(3 * HIDDEN + FFN, dtype=torch.float32), norm_eps=1e-5)),
    "dense": (HIDDEN, HIDDEN, {}),
    "fc2": (HIDDEN, FFN, dict(residual=empty(1, 1, HIDDEN))),
}


def build_gemvs(kernel, stages=None, **constants) -> list[Build]:
    """`kernel` launched by gemv.launch for each product, with the engine's tile (and `stages`, if given)."""
    from matvlm_cli.kernels import gemv

    builds: list[Build] = []
    for out_features, in_features, extra in PRODUCTS.values():
        tile = gemv.tiles(out_features, in_features, H200_SMS)
        gemv.launch(Builder(kernel, builds), empty(1, 1, in_features), empty(out_features, in_features), empty(out_features),
                    tile=tile._replace(stages=stages or tile.stages), **extra, **constants)
    return builds


def named(names, builds: list[Build], prefix="") -> dict[str, Build]:
    return {f"{prefix}{name}": build for name, build in zip(names, builds, strict=True)}


def build_all() -> dict[str, Build]:
    from matvlm_cli.kernels import attention, cache_write, gemv, step

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the experiments' variants
    import decode_combine
    import gemv_prefetch

    builds = named(PRODUCTS, build_gemvs(gemv._gemv_kernel), "gemv ")
    builds |= named(PRODUCTS, build_gemvs(gemv._gemv_kernel, stages=3), "gemv 3 stages ")
    builds |= named(PRODUCTS, build_gemvs(gemv_prefetch.gemv_prefetching, EARLY_LAUNCH=False), "prefetch ")

    query, keys, values = empty(1, HEADS, 1, HEAD_DIM), empty(1, HEADS, SLOTS, HEAD_DIM), empty(1, HEADS, SLOTS, HEAD_DIM)
    keep = torch.zeros(1, SLOTS, dtype=torch.bool)
    with building(attention, "split_kv", "combine") as made:
        attention.split_kv_decode(query, keys, values, keep, HEAD_DIM**-0.5)
    builds |= named(["split_kv", "combine"], made)
    with building(decode_combine, "split_kv_merging") as made:
        decode_combine.merging_decode(query, keys, values, keep, HEAD_DIM**-0.5)
    builds |= named(["split_kv, merging"], made)

    with building(cache_write, "_write_token_kernel") as made:
        cache_write.write_token(keys, values, empty(1, HEADS, 1, HEAD_DIM), empty(1, HEADS, 1, HEAD_DIM), torch.zeros(1, dtype=torch.int64))
    builds |= named(["write_token"], made)
    # the 0.5 hybrid's Mamba-2 step: MaTVLM's mapping gives 32 heads of 80, a state of 80 and 32 groups
    d_inner, d_state, groups, conv = HEADS * HEAD_DIM, HEAD_DIM, HEADS, 4
    conv_dim = d_inner + 2 * groups * d_state
    with building(step, "_mamba2_step_kernel") as made:
        step.mamba2_step(empty(1, d_inner + conv_dim + HEADS), empty(1, conv_dim, conv), empty(conv_dim, conv), empty(conv_dim),
                         empty(HEADS, dtype=torch.float32), empty(HEADS, dtype=torch.float32), empty(HEADS, dtype=torch.float32),
                         empty(1, HEADS, HEAD_DIM, d_state, dtype=torch.float32), empty(d_inner), groups, d_state, 0.0, float("inf"), 1e-5)
    return builds | named(["mamba2_step"], made)


def width(op: str) -> int:
    """Bytes a thread moves with one load: LDG.E.128 16, LDG.E.64 8, LDG.E 4, LDG.E.U16 2."""
    last = op.rsplit(".", 1)[1]
    bits = last if last.isdigit() else last[1:] if last[1:].isdigit() else "32"
    return int(bits) // 8


def widest(loads: dict[str, int], into_shared: bool) -> int:
    """The widest load into registers (LDG), or into shared memory (LDGSTS, cp.async); 0 if none."""
    return max((width(op) for op in loads if op.startswith("LDGSTS") == into_shared), default=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write every build's numbers here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("hopper_build.py: unset TRITON_INTERPRET (the interpreter replaces the kernels it builds)")
    builds = build_all()
    print(f"Triton {triton.__version__}, built for sm_90 with PDL on. per SM: programs that fit at once")
    print("(registers, shared memory, threads). LDG, cp.async: the widest load, bytes a")
    print("thread, into registers and into shared memory (- if none).")
    print(f"{'kernel':<22} {'programs':>8} {'warps':>5} {'regs':>4} {'smem':>6} {'per SM':>6} {'LDG':>4} {'cp.async':>8}")
    for name, build in builds.items():
        programs = 1
        for size in build.grid:
            programs *= size
        print(f"{name:<22} {programs:>8} {build.warps:>5} {build.registers:>4} {build.shared / 1024:>4.1f}KB "
              f"{build.programs_per_sm:>6} {build.widest_load or '-':>4} {build.widest_copy or '-':>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "builds": {name: asdict(b) for name, b in builds.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
