"""Per-architecture launch limits and occupancy, and the fused mlp_t kernel's configs against them."""

import pytest
import torch
from trm_kernels import arch as A


def test_occupancy_by_hand():
    # sm_86, 32 registers x 4 warps: 4096 registers per block allow 16 blocks, 48 warps allow 12
    assert A.occupancy(A.ARCHS[86], registers=32, shared=0, warps=4) == (12, "warps")
    # sm_90, 255 registers x 8 warps: 32 x 256 per warp x 8 = 65536, the whole register file
    assert A.occupancy(A.ARCHS[90], registers=255, shared=1024, warps=8) == (1, "registers")
    # sm_89, 40 KB + 1 KB reserved per block in 100 KB: 2 blocks
    assert A.occupancy(A.ARCHS[89], registers=64, shared=40 * 1024, warps=4) == (2, "shared memory")
    # sm_80, a tiny kernel: the 32-block cap
    assert A.occupancy(A.ARCHS[80], registers=16, shared=0, warps=1) == (32, "blocks")


def test_launch_problems_name_the_limit():
    assert A.launch_problem(A.ARCHS[90], 255, 227 * 1024, 8) is None
    assert "shared memory" in A.launch_problem(A.ARCHS[89], 64, 100 * 1024, 4)
    assert "threads" in A.launch_problem(A.ARCHS[90], 32, 0, 64)
    assert "registers per block" in A.launch_problem(A.ARCHS[90], 255, 0, 16)


def test_nearest_listed_architecture():
    assert A.nearest(87).capability == 86 and A.nearest(103).capability == 100 and A.nearest(121).capability == 120
    assert A.nearest(90).capability == 90 and A.nearest(75) is None and A.nearest(110) is None


token_mlp = pytest.importorskip("trm_kernels.token_mlp", exc_type=ImportError)


def _family(capability: int) -> dict:
    return token_mlp.configs(capability)


def test_every_config_has_a_shared_memory_row_for_every_architecture_of_its_family():
    rows = {}
    for capability in A.ARCHS:
        for seq_class, tiles in _family(capability).items():
            for tile in tiles:
                rows.setdefault((seq_class, *tile), set()).add(capability)
    assert {key: set(row) for key, row in token_mlp.SHARED_BYTES.items()} == rows
    assert token_mlp.family(90) == token_mlp.family(100) == "wgmma" and token_mlp.family(86) == "mma.sync"


def test_every_config_launches_and_every_architecture_keeps_one_per_sequence_tile():
    """At the most registers ptxas can give (255), so the register limits are checked too."""
    for capability, a in A.ARCHS.items():
        for seq_class, tiles in _family(capability).items():
            ok = [t for t in tiles if A.launch_problem(a, 255, token_mlp.SHARED_BYTES[(seq_class, *t)][capability],
                                                        t[-1]) is None]  # fmt: skip
            assert ok, (a.target, seq_class)


def test_pruning_reads_the_device_budget(monkeypatch):
    cpu = torch.device("cpu")
    assert token_mlp.launchable_tiles(97, cpu) == token_mlp.configs(None)[128]  # no limit where nothing launches
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (90, 100 * 1024))
    # on Hopper the 128x64 and 64x64 tiles take 128 and 112 KB: over a 100 KB budget
    assert token_mlp.launchable_tiles(97, cpu) == [(64, 32, 4)]
    assert token_mlp.launchable_tiles(200, cpu) == [(32, 32, 8)]  # S <= 256: 66 KB
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (90, 60 * 1024))
    assert token_mlp.launchable_tiles(200, cpu) == []
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (86, 99 * 1024))
    assert token_mlp.launchable_tiles(97, cpu) == token_mlp.configs(86)[128]  # mma.sync tiles: smaller, all fit
    # an architecture nothing listed stands for: its family's tiles, at the most any listed architecture needs
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (75, 100 * 1024))
    assert token_mlp.launchable_tiles(97, cpu) == [(64, 32, 8), (32, 64, 8), (32, 32, 4)]  # 64x64: 112 KB on sm_90


def test_the_training_backward_launches_on_every_architecture_and_is_checked_against_the_budget(monkeypatch):
    for (seq_class, which), row in token_mlp.BWD_SHARED_BYTES.items():
        warps = token_mlp.BWD_CONFIGS[seq_class][which][-1]
        for capability, a in A.ARCHS.items():
            assert A.launch_problem(a, 255, row[capability], warps) is None, (a.target, seq_class, which)
    cpu = torch.device("cpu")
    assert token_mlp.backward_fits(200, cpu)  # no limit where nothing launches
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (90, 90 * 1024))
    assert token_mlp.backward_fits(97, cpu) and not token_mlp.backward_fits(200, cpu)  # 94 KB at S <= 256
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (100, 90 * 1024))
    assert not token_mlp.backward_fits(97, cpu)  # the dh kernel takes 96 KB on sm_100
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (75, 64 * 1024))
    assert not token_mlp.backward_fits(97, cpu)  # what any listed architecture needs: over 64 KB


def test_doctor_says_what_ci_verified_for_the_users_architecture():
    from trm.doctor import static_verification

    assert "compiled and checked" in static_verification(89)
    assert "sm_86 stands for it" in static_verification(87)
    assert "not among" in static_verification(75)


def test_fp32_on_a_gpu_takes_no_gemm_epilogue_or_token_mixer_kernel(monkeypatch):
    """Compiled in fp32 (IEEE products), those kernels need up to 193 KB of shared memory (over
    sm_86/89/120's 99 KB) and spill: on a GPU, fp32 runs cuBLAS + the element-wise kernels.
    The interpreter (no limits) still runs them in fp32, which is how they are tested."""
    from trm_kernels import channel_mlp

    cpu, like = torch.device("cpu"), torch.empty(2, 8, dtype=torch.float32)
    assert token_mlp.launchable_tiles(97, cpu, torch.float32) and channel_mlp.launchable(cpu, torch.float32)
    for module in (token_mlp, channel_mlp):
        monkeypatch.setattr(module, "device_budget", lambda device: (90, 227 * 1024))
    assert token_mlp.launchable_tiles(97, cpu, torch.float32) == [] and not token_mlp.backward_fits(
        97, cpu, torch.float32
    )
    assert token_mlp.launchable_tiles(97, cpu, torch.bfloat16) == token_mlp.configs(90)[128]
    assert channel_mlp.launchable(cpu, torch.float32) == [] and channel_mlp.launchable(cpu, torch.float16)
    assert not channel_mlp._norm_launchable(like, 512) and channel_mlp._norm_launchable(like.half(), 512)
