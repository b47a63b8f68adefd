"""What each NVIDIA GPU generation lets one kernel launch use, and the occupancy that follows.

Every limit is a compute-capability fact from the CUDA C++ Programming Guide, "Compute
Capabilities", table "Technical Specifications per Compute Capability" (CUDA 13): per-block
shared memory is the opt-in maximum (what Triton raises its kernels' limit to), per-SM
shared memory is what blocks share, and the register file is 64K 32-bit registers per SM
and per block on every architecture listed, at most 255 per thread. Occupancy follows the
CUDA occupancy calculator's rules for compute capability 8.0 and later: registers are
allocated per warp in units of 256, shared memory per block in units of 128 bytes plus
1 KB the system reserves per block.

No GPU is needed to use this module: ``trm_benchmarks.ptx`` holds the compiled kernels
against these limits for every listed architecture, and ``trm_kernels.token_mlp`` prunes
its autotuner's configs with them at run time.
"""

from __future__ import annotations

import dataclasses
import math

SOURCE = "CUDA C++ Programming Guide (CUDA 13), Compute Capabilities: Technical Specifications per Compute Capability"
REGISTERS_PER_SM = REGISTERS_PER_BLOCK = 64 * 1024
REGISTERS_PER_THREAD = 255
THREADS_PER_BLOCK = 1024
REGISTER_UNIT = 256  # registers are allocated per warp, in units of this many
SHARED_UNIT = 128  # shared memory is allocated per block in units of this many bytes
SHARED_RESERVED = 1024  # bytes the system reserves per resident block (compute capability >= 8.0)


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int  # 10 * major + minor
    name: str
    cards: str  # examples of each generation users train TRM on
    shared_per_block: int  # bytes, opt-in maximum
    shared_per_sm: int
    threads_per_sm: int
    blocks_per_sm: int
    mma: str  # the tensor-core instruction family Triton emits for tl.dot here

    @property
    def target(self) -> str:
        return f"sm_{self.capability}"

    @property
    def warps_per_sm(self) -> int:
        return self.threads_per_sm // 32


KB = 1024
ARCHS: dict[int, Arch] = {
    a.capability: a
    for a in (
        Arch(80, "Ampere", "A100, A30", 163 * KB, 164 * KB, 2048, 32, "mma.sync"),
        Arch(86, "Ampere", "RTX 3090, A10, A40", 99 * KB, 100 * KB, 1536, 16, "mma.sync"),
        Arch(89, "Ada", "L40S, L4, RTX 4090", 99 * KB, 100 * KB, 1536, 24, "mma.sync"),
        Arch(90, "Hopper", "H100, H200, GH200", 227 * KB, 228 * KB, 2048, 32, "wgmma"),
        Arch(100, "Blackwell", "B200, GB200", 227 * KB, 228 * KB, 2048, 32, "tcgen05"),
        Arch(120, "Blackwell (consumer)", "RTX 5090, RTX PRO 6000", 99 * KB, 100 * KB, 1536, 24, "mma.sync"),
    )
}


def nearest(capability: int) -> Arch | None:
    """The listed architecture whose compiled kernels stand for `capability`: itself, or the
    newest listed one before it in the same major version (8.7 -> 8.6, 10.3 -> 10.0,
    12.1 -> 12.0). None where no listed architecture shares the major version."""
    same_major = [c for c in ARCHS if c // 10 == capability // 10 and c <= capability]
    return ARCHS[max(same_major)] if same_major else None


def launch_problem(arch: Arch, registers: int, shared: int, warps: int) -> str | None:
    """Why a kernel with these resources cannot launch on `arch`, or None."""
    if shared > arch.shared_per_block:
        return f"{shared} B of shared memory > {arch.shared_per_block} B per block on {arch.target}"
    if registers > REGISTERS_PER_THREAD:
        return f"{registers} registers per thread > {REGISTERS_PER_THREAD}"
    if warps * 32 > THREADS_PER_BLOCK:
        return f"{warps * 32} threads > {THREADS_PER_BLOCK} per block"
    if _registers_per_block(registers, warps) > REGISTERS_PER_BLOCK:
        return f"{_registers_per_block(registers, warps)} registers per block > {REGISTERS_PER_BLOCK}"
    return None


def _registers_per_block(registers: int, warps: int) -> int:
    return math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT * warps


def occupancy(arch: Arch, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """(resident blocks per SM, what limits it) for a kernel that can launch on `arch`."""
    per_block_shared = math.ceil(shared / SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED
    limits = {
        "blocks": arch.blocks_per_sm,
        "warps": arch.warps_per_sm // warps,
        "registers": REGISTERS_PER_SM // max(1, _registers_per_block(registers, warps)),
        "shared memory": arch.shared_per_sm // per_block_shared,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter
