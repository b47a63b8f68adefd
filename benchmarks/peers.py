"""The kernels a user would otherwise pick, timed beside ours at TRM's shapes, and their wheels
for a machine without a network.

    python -m trm_benchmarks.peers status                       # which peers import here, and their versions
    python -m trm_benchmarks.peers download DIR                 # wheels for Python 3.12, CUDA 13, manylinux x86_64
    python -m trm_benchmarks.peers download DIR --python 3.11 --peers liger

Peers: Liger-Kernel (RMSNorm, fused add + RMSNorm, SwiGLU, cross-entropy; Triton), QuACK
(RMSNorm with a residual; CuTe DSL), PyTorch's SDPA backends (flash, cuDNN, memory-efficient)
and ``torch.compile`` (default and max-autotune). Each peer is imported lazily: one that
does not import is recorded as "not installed" (with the reason), never an error.

``download`` fetches each peer's wheel and, recursively, the wheels it requires for the given
Python version and platform, leaving out what a GPU machine's PyTorch stack already has
(torch, triton, the CUDA runtime wheels). ``bash benchmarks/gpu.sh OUT first`` installs from
``benchmarks/wheels`` with ``--no-index --no-deps`` where a peer does not import. Sizes
(2026-12-01, Python 3.12, CUDA 13): Liger-Kernel 0.9 MB; QuACK with NVIDIA's CUTLASS DSL and
what it requires 202 MB in 12 wheels (its CUDA 12 and 13 libraries both).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

PEERS = {"liger": ("liger-kernel", "liger_kernel"), "quack": ("quack-kernels", "quack")}  # name: (dist, module)
# what a GPU machine's PyTorch stack has: never downloaded (torch alone is GBs)
PROVIDED = re.compile(
    r"^(torch|triton|nvidia-(?!cutlass)[a-z0-9-]+|pytorch-triton.*|setuptools|numpy|typing-extensions)$"
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip


def status() -> dict[str, str]:
    """Each peer: its version where it imports, else "not installed" and why."""
    out = {}
    for name, (dist, module) in PEERS.items():
        try:
            importlib.import_module(module)
            out[name] = importlib.metadata.version(dist)
        except Exception as e:  # not installed, or installed but not importable here (no GPU stack)
            out[name] = f"not installed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: pathlib.Path, python: str, extras: frozenset[str] = frozenset({""})) -> list[str]:
    """The requirements of `wheel` that apply on `python` for `extras` ("": those without an
    extra; e.g. "cu13" for QuACK's CUDA 13 libraries)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix"}  # fmt: skip
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in extras or ("",)):
            out.append(str(req).split(";")[0].strip())
    return out


def _fetch(spec: str, out: pathlib.Path, python: str, platforms: tuple[str, ...]) -> list[pathlib.Path]:
    """The wheel(s) `pip download` brings for one requirement, without its dependencies."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                "--python-version", python, "--implementation", "cp", "-d", tmp, spec]  # fmt: skip
        for platform in platforms:
            args += ["--platform", platform]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {spec}: {done.stderr.strip().splitlines()[-1:]}")
        got = []
        for wheel in pathlib.Path(tmp).glob("*.whl"):
            target = out / wheel.name
            target.write_bytes(wheel.read_bytes())
            got.append(target)
        return got


def download(out: pathlib.Path, peers=tuple(PEERS), python: str = "3.12", cuda: int = 12, platforms=PLATFORMS,
             log=print) -> list:  # fmt: skip
    """Every wheel the peers need on `python`, `platforms` and CUDA `cuda` (12 or 13: QuACK's
    CUTLASS DSL libraries differ), into `out` (created); returns them."""
    from packaging.requirements import Requirement

    out.mkdir(parents=True, exist_ok=True)
    cuda_extra = "[cu13]" if cuda == 13 else ""
    queue = [PEERS[p][0] + (cuda_extra if p == "quack" else "") for p in peers]
    fetched: dict[str, list[pathlib.Path]] = {}  # package -> its wheels
    extras_done: dict[str, set[str]] = {}  # package -> the extras whose requirements are queued
    while queue:
        req = Requirement(queue.pop(0))
        name = _normal(req.name)
        if PROVIDED.match(name):
            continue
        new = set(req.extras) - extras_done.get(name, set())
        if name in fetched and not new:
            continue
        if name not in fetched:
            fetched[name] = _fetch(f"{req.name}{req.specifier}", out, python, platforms)
            for wheel in fetched[name]:
                log(f"{wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")
            new.add("")
        extras_done.setdefault(name, set()).update(new)
        for wheel in fetched[name]:
            queue += requirements(wheel, python, frozenset(new))
    return [w for wheels in fetched.values() for w in wheels]


# ---- the peers' ops, as callables on our ops' arguments --------------------------------------


def rmsnorm(name: str) -> Callable | None:
    """rmsnorm(x + r) over the last axis, no weight (TRM's post-norm), by a peer; None if it
    has no such op. Liger and QuACK take a weight: ones, read as part of their bytes."""
    if name == "liger":
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        def liger(x, r, w):
            return LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-5)[0]

        return liger
    if name == "quack":
        from quack.rmsnorm import rmsnorm as quack_rmsnorm

        return lambda x, r, w: quack_rmsnorm(x, w, residual=r, eps=1e-5)
    return None


def swiglu(name: str) -> Callable | None:
    """silu(gate) * up of separate gate and up tensors, by a peer."""
    if name == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    return None


def cross_entropy(name: str) -> Callable | None:
    """Per-token softmax cross-entropy (no reduction), by a peer."""
    if name == "liger":
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        return lambda logits, labels: LigerCrossEntropyFunction.apply(logits, labels, None, -100, 0.0, 0.0, "none")[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="which peers import here")
    get = sub.add_parser("download", help="the peers' wheels and what they require, for another machine")
    get.add_argument("out", type=pathlib.Path, help="folder for the wheels (created)")
    get.add_argument("--python", default="3.12", help="the target machine's Python (default %(default)s)")
    get.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from %(default)s")
    get.add_argument("--cuda", type=int, choices=(12, 13), default=13, help="the target's CUDA major (%(default)s)")
    args = parser.parse_args(argv)
    if args.command == "status":
        for name, state in status().items():
            print(f"{name}: {state}")
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in peers if p not in PEERS]:
        parser.error(f"--peers {','.join(unknown)}: choose from {', '.join(PEERS)}")
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python {args.python}: a version such as 3.12")
    try:
        wheels = download(args.out, peers, args.python, args.cuda)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{len(wheels)} wheels, {total:.1f} MB, in {args.out}: install with "
          f"pip install --no-index --no-deps {args.out}/*.whl", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
