import os

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be chosen
# before any module defining kernels is imported, i.e. here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
    except ImportError:
        pass
    else:
        from trm_kernels._triton import interpreter_problem

        if (problem := interpreter_problem(triton.__version__, np.__version__)) is not None:
            pytest.exit(problem, returncode=4)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# No timing of fused GEMMs against cuBLAS (trm_kernels.tune) unless a test asks for it: on a
# GPU the tests then run the fused kernels themselves, and count the ops they dispatch.
os.environ.setdefault("TRM_TUNE", "off")


@pytest.fixture(scope="session")
def sudoku4_data(tmp_path_factory):
    """A small generated 4x4 Sudoku dataset (600 train with 1 augmentation each, 64 test)."""
    from trm.config import DataConfig
    from trm.data.dataset import build

    out = tmp_path_factory.mktemp("data") / "sudoku4"
    return build(DataConfig(size=4, num_train=300, num_test=64, augmentations=1, seed=1), out)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """`auto` on CPU tries a 'triton' implementation first, where a test registers one (the real
    Triton kernels are left out); registrations and checks are undone after."""
    import trm_kernels as K
    from trm_kernels import backend, verify

    only_reference = {op: {"reference": impls["reference"]} for op, impls in backend._REGISTRY.items()}
    monkeypatch.setattr(backend, "_REGISTRY", only_reference)
    monkeypatch.setitem(backend.AUTO_ORDER, "cpu", ("triton", "reference"))
    monkeypatch.setattr(verify, "verified", {})
    monkeypatch.delenv("TRM_BACKEND", raising=False)
    with verify.use_verify("first"), K.use_backend("auto"):
        yield


@pytest.fixture
def fresh_choices(monkeypatch):
    """No timed choice of trm_kernels.tune and no stand-in timer before or after the test
    (TRM_TUNE=off above): the fused-GEMM tests ask for it."""
    from trm_kernels import tune

    tune.reset()
    monkeypatch.setattr(tune, "_timer", None)
    yield
    tune.reset()
