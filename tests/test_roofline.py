"""The speed-of-light model's counts: FLOPs against hand counts, launches against an
independent count (the profiler's record of the same step), and its predictions' arithmetic."""

import json
import types

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from torch.profiler import ProfilerActivity, profile
from trm_benchmarks import roofline as R
from trm_benchmarks.model import step_flops

from trm.config import preset

META = torch.device("meta")


def _counted(fn, backend="reference"):
    counter = R.Counter()
    with K.use_backend(backend), R._FlashAttention(), counter:
        fn()
    return counter.ops


def test_one_gemm_by_hand():
    x, w = torch.empty(3, 5, 16, device=META), torch.empty(32, 16, device=META)
    ops = _counted(lambda: F.linear(x, w))
    assert [op.name for op in ops] == ["aten.mm"] and ops[0].flops == 2 * 15 * 16 * 32
    assert ops[0].bytes == 4 * (15 * 16 + 32 * 16 + 15 * 32) and ops[0].launches == 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_attention_call_by_hand(backend):
    batch, seq, heads, d = 2, 7, 2, 32
    qkv = torch.empty(batch, seq, 3 * heads * d, device=META, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.empty(seq, d, device=META), torch.empty(seq, d, device=META)
    ops = _counted(lambda: K.rope_attention(qkv, cos, sin, heads).sum().backward(), backend)
    scores = batch * heads * seq * seq * d  # one S x S x d product per head: 2 * scores FLOPs
    forward = [op for op in ops if op.name in ("aten._scaled_dot_product_flash_attention", "trm.rope_attention")]
    assert len(forward) == 1 and forward[0].flops == 2 * 2 * scores  # q k^T, p v
    backward = [op for op in ops if "backward" in op.name and "attention" in op.name]
    # PyTorch's flash backward: 5 products (torch.utils.flop_counter); ours recomputes q k^T and
    # dO v^T in both of its kernels: 7 products
    assert len(backward) == 1 and backward[0].flops == (5 if backend == "reference" else 7) * 2 * scores
    assert backward[0].launches == (1 if backend == "reference" else 3)


@pytest.mark.parametrize("step", ["train", "eval"])
def test_whole_step_gemm_flops_match_a_hand_count(step):
    """Every GEMM of a sudoku-mlp step against trm_benchmarks.model.step_flops, which counts
    the nets' and heads' products by hand from the config."""
    cfg, batch = preset("sudoku-mlp").model, 4
    counted = sum(op.flops for op in R.count_step("sudoku-mlp", "eager", step, batch))
    assert counted == step_flops(cfg, batch, step == "train")


@pytest.mark.parametrize("step", ["train", "eval"])
def test_the_fused_channel_mlp_counts_the_products_eager_runs(step):
    """sudoku-mlp has no attention (whose fused backward recomputes two products): its fused
    step, the SwiGLU MLP's GEMM epilogues included, does the eager step's matrix FLOPs, plus,
    training, what each mlp_t backward recomputes: gate|up in both of its kernels (4 I*S*D
    per batch element each) and d(act) in the second (2): 10/6 of its forward's 6."""
    fused = R.count_step("sudoku-mlp", "fused", step, 4)
    recomputed = sum(op.flops for op in fused if op.name == "trm.token_mlp_rmsnorm_train") * 10 // 6
    assert (recomputed > 0) == (step == "train")
    eager = sum(op.flops for op in R.count_step("sudoku-mlp", "eager", step, 4))
    assert sum(op.flops for op in fused) == eager + recomputed
    names = {op.name for op in fused}
    assert "trm.swiglu_mlp: gate|up GEMM + SwiGLU" in names  # (trm.swiglu remains: mlp_t's, with grad)
    assert ("trm.swiglu_mlp_backward" in names) == (step == "train")


def test_break_even_against_a_hand_count():
    """One GPU with 1 B/s and 1 FLOP/s: every time is bytes or FLOPs, in seconds."""
    gpu = R.GPU("unit", 1.0, 1.0, "a test")
    rows, hidden, inter = 10, 4, 6
    forward, training, backward, norm, norm_training = R.break_even(gpu, rows, hidden, inter, elt=1)
    x, gu, act, w_gu, w_down = 40, 120, 60, 48, 24
    up, down = 2 * rows * hidden * 2 * inter, 2 * rows * hidden * inter  # 960 and 480: compute-bound
    composed = up + (gu + act)
    assert forward["composed_us"] == pytest.approx(composed * 1e6)
    assert forward["fused_memory_us"] == pytest.approx((x + w_gu + act) * 1e6)
    assert forward["break_even"] == pytest.approx(up / composed)
    assert training["fused_memory_us"] == pytest.approx((x + w_gu + act + gu) * 1e6)
    assert backward["break_even"] == pytest.approx(down / (down + act + 2 * gu))
    # down GEMM (compute-bound) + add + RMSNorm reading h and mix, writing out and rstd
    assert norm["break_even"] == pytest.approx(down / (down + 3 * x + rows * 4))
    assert norm_training["fused_memory_us"] == pytest.approx((act + w_down + 3 * x + rows * 4) * 1e6)
    # memory-bound (1 byte per 1e6 s): both fused kernels move fewer bytes than the composition,
    # so they win even with a GEMM at a small fraction of cuBLAS's rate
    slow = R.break_even(R.GPU("narrow", 1e-6, 1.0, "a test"), rows, hidden, inter, elt=1)
    assert slow[1]["break_even"] == pytest.approx(up / ((x + w_gu + gu + gu + act) * 1e6))
    assert slow[2]["break_even"] == pytest.approx(down / ((x + w_down + act + act + 2 * gu) * 1e6))


def _composite(overload: str) -> bool | None:
    """Whether PyTorch decomposes this overload before any device kernel (None: not a dispatcher op)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(overload, "CompositeImplicitAutograd")
    except RuntimeError:
        return None


def _profiled_launches(events) -> int:
    """Launches as the profiler saw a step, from its record of every aten op called from
    Python or autograd (an op nested in another is that op's own business): a composite op
    (one PyTorch decomposes before any device kernel: linear, to, reshape, square, ...)
    launches what its callees launch; views, allocations and ops returning no tensor launch
    nothing; every other aten op launches one kernel; our ops what LAUNCHES says."""

    def launches(e) -> int:
        kind, _, name = e.name.partition("::")
        if kind == "trm":
            return R.LAUNCHES[f"trm.{name}"]
        packet = getattr(torch.ops.aten, name)
        composite = [
            _composite(e.name + ("" if o == "default" else f".{o}")) for o in packet.overloads() if "out" not in o
        ]
        composite = [c for c in composite if c is not None]
        if composite and all(composite):
            return sum(launches(c) for c in e.cpu_children if c.name.startswith("aten::"))
        schemas = [getattr(packet, o)._schema for o in packet.overloads()]
        schemas = [s for s in schemas if s.returns and str(s.returns[0].type).startswith("Tensor")]
        alias = [s.returns[0].alias_info for s in schemas]
        if not schemas or all(a is not None and not a.is_write for a in alias):  # no tensor, or a view
            return 0
        return 0 if f"aten.{name}" in R.NO_LAUNCH or name.startswith("empty") else 1

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(("aten::", "trm::")):
                return False
            p = p.cpu_parent
        return True

    return sum(launches(e) for e in events if e.name.startswith(("aten::", "trm::")) and outermost(e))


@pytest.mark.parametrize("provider", ["eager", "fused"])
@pytest.mark.parametrize("step", R.STEPS)
@pytest.mark.parametrize("config", R.TRM_CONFIGS)
def test_launch_counts_equal_the_profilers_count_of_the_same_step(config, provider, step):
    """The same step run twice: once counted, once recorded by the profiler."""
    counted = sum(op.launches for op in R.count_step(config, provider, step, 2))
    counted -= step == "adaptive"  # the host's read of the halted slots, added after the step
    recorder = profile(activities=[ProfilerActivity.CPU])
    R.run_step(config, provider, step, 2, recorder, types.SimpleNamespace(graphed=False))
    assert counted == _profiled_launches(recorder.events())


def test_graphs_collapse_each_captured_region_to_one_launch():
    ops = R.count_step("sudoku-mlp", "fused", "eval", 2)
    assert all(op.graphed for op in ops)
    gpu = R.GPUS["h100"]
    graphs, fused = R.predict(ops, "fused + CUDA graphs", gpu), R.predict(ops, "fused", gpu)
    assert graphs["launches"] == 1 and graphs["replays"] == 1 and fused["launches"] == sum(op.launches for op in ops)
    train = R.count_step("sudoku-mlp", "fused", "train", 2)
    graphed = [op for op in train if op.graphed]
    assert graphed and len(graphed) < len(train)
    assert R.predict(train, "fused + CUDA graphs", gpu)["launches"] == 1 + sum(
        op.launches for op in train if not op.graphed
    )


def test_an_adaptive_step_is_the_evaluation_step_plus_refills_and_bookkeeping():
    fixed = R.count_step("sudoku-mlp", "fused", "eval", 64)
    adaptive = R.count_step("sudoku-mlp", "fused", "adaptive", 64, mean_steps=4)
    assert [(op.name, op.bytes) for op in adaptive if op.graphed] == [(op.name, op.bytes) for op in fixed]
    around = [op for op in adaptive if not op.graphed]
    assert {"aten.index_put_", "aten.where", "aten.argmax"} <= {op.name for op in around}
    assert around[-1].name == "host read of halted slots" and around[-1].launches == 1

    def refill_bytes(mean_steps):  # 64 / mean_steps slots refilled: their rows of x, y and z written
        ops = R.count_step("sudoku-mlp", "fused", "adaptive", 64, mean_steps=mean_steps)
        return sum(op.bytes for op in ops if op.name == "aten.index_put_")

    cfg = preset("sudoku-mlp").model
    row = (cfg.seq_len + cfg.puzzle_emb_len) * cfg.hidden_size * 2  # one slot's x, y or z in bf16
    # x's new rows are read (the embedded puzzles) and written; y and z are written from the
    # initial state, one row broadcast over the slots (read once whatever their number)
    assert refill_bytes(4) - refill_bytes(8) == pytest.approx((2 + 1 + 1) * (16 - 8) * row, rel=0.01)


def test_prediction_is_the_sum_of_each_ops_largest_term():
    gpu = R.GPU("test", bandwidth=1e12, bf16=1e14, source="made up")
    ops = [R.Op("memory", bytes=10**7, flops=0, launches=1, graphed=False),  # 10 µs of memory
           R.Op("compute", bytes=0, flops=10**9, launches=1, graphed=False),  # 10 µs of compute
           R.Op("launch", bytes=10, flops=10, launches=2, graphed=False)]  # fmt: skip
    p = R.predict(ops, "eager", gpu)
    assert p["us"] == pytest.approx(10 + 10 + 2 * R.LAUNCH_US["eager"])
    assert {name: e["bound"] for name, e in p["ops"].items()} == {"memory": "memory", "compute": "compute",
                                                                   "launch": "launch"}  # fmt: skip


def test_report_is_labelled_predicted_and_names_the_next_targets(tmp_path):
    R.main(["--configs", "sudoku-mlp", "--gpus", "h100-measured", "--batches", "2", "--out", str(tmp_path)])
    text = (tmp_path / "roofline.md").read_text()
    assert text.startswith("# Speed-of-light model") and "PREDICTED, NOT MEASURED" in text.splitlines()[0]
    assert "Next fusion targets" in text and "h100-measured" in text


def test_bad_arguments_exit_2_with_one_line(capsys):
    for argv in (["--configs", "nope"], ["--gpus", "v100"], ["--batches", "0"], ["--measured", "/nonexistent"]):
        with pytest.raises(SystemExit) as e:
            R.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_measured_figures_are_held_against_the_prediction_for_their_gpu(tmp_path):
    """A doctor.json from an L40S (numbers made up for the test): its batch-16 training steps
    against the prediction for an L40S of the same step (no optimizer, as doctor times it)."""
    checks = [{"kind": "speed", "name": "sudoku-mlp training step", "backend": b, "dtype": "bfloat16",
               "shape": "batch 16", "passed": None, "detail": "", "numbers": {"ms": ms}}
              for b, ms in (("reference", 20.0), ("auto", 10.0))]  # fmt: skip
    (tmp_path / "doctor.json").write_text(json.dumps({"environment": {"device": "NVIDIA L40S"}, "checks": checks}))
    result = R.compare_measured(tmp_path)
    assert result["gpu"] == "l40s" and [r["provider"] for r in result["rows"]] == ["eager", "fused"]
    for r, ms in zip(result["rows"], (20.0, 10.0), strict=True):
        ops = R.count_step("sudoku-mlp", r["provider"], R.DOCTOR_STEP, 16)
        assert r["predicted_ms"] == pytest.approx(R.predict(ops, r["provider"], R.GPUS["l40s"])["us"] / 1e3)
        assert r["measured_over_predicted"] == pytest.approx(ms / r["predicted_ms"])
    assert not any(op.name == "aten.atan2" for op in ops)  # no optimizer step in what doctor times
    (tmp_path / "doctor.json").write_text(json.dumps({"environment": {"device": "Tesla T4"}, "checks": checks}))
    assert R.compare_measured(tmp_path)["rows"] == []


def test_the_recurrent_depth_lms_step_counts_its_products_and_its_causal_attention():
    """Both providers compute the same linear layers (torch's FLOP counter); attention by the
    (query, key) pairs its kernels compute: ours skips the blocks above the diagonal, the one
    fused kernel PyTorch's SDPA runs with a key mask (whose causal part is in the mask)
    computes every pair, once forward and once backward."""
    from trm_benchmarks.recurrent_depth import LMConfig

    cfg, batch = LMConfig(), 2
    s, d, hd = cfg.seq_len, cfg.hidden_size, cfg.head_dim
    tokens = batch * s
    linear = 2 * tokens * d * ((cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd
                               + 3 * cfg.intermediate_size)  # fmt: skip
    head = 2 * tokens * d * cfg.vocab_size
    causal, every = batch * cfg.num_heads * hd * s * (s + 1) // 2, batch * cfg.num_heads * hd * s * s
    counts = {p: R.count_step(R.LM, p, "train", batch) for p in ("eager", "fused")}
    for provider, ops in counts.items():
        gemm = sum(op.flops for op in ops if "attention" not in op.name)  # aten GEMMs, the SwiGLU MLP's epilogue GEMMs
        attention = sum(op.flops for op in ops if "attention" in op.name)
        assert gemm == 3 * (cfg.loops * linear + head), provider
        want = every * (4 + 10) if provider == "eager" else causal * (4 + 14)
        assert attention == cfg.loops * want, provider
    assert {op.name for op in counts["eager"] if "attention" in op.name} == {
        "aten._fused_attention",
        "aten._fused_attention_backward",
    }
    fused_names = {op.name for op in counts["fused"]}
    assert {"trm.rope_attention", "trm.add_rmsnorm", "trm.swiglu_mlp_backward", "trm.inject"} <= fused_names
    report = R.run(configs=(R.LM,), gpus=("h100",), batches=(768,))
    assert {e["batch"] for e in report["steps"]} == set(R.LM_BATCHES) and "recurrent-depth" in R.markdown(report)


def test_the_recurrent_depth_lms_decode_step_reads_the_weights_per_loop_and_the_whole_caches():
    """A decode step of QUICK by hand: one token per sequence against caches of C = seq_len
    positions, in bf16. FLOPs: every linear layer once per loop, and q k^T, p v against the C
    cached keys; the fused attention op reads each loop's whole cache; every weight is read
    once per loop (the head once)."""
    from trm_benchmarks.recurrent_depth import QUICK

    cfg, batch, elt = QUICK, 2, 2
    d, hd, heads, kv, c = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.seq_len
    per_loop = (heads + 2 * kv) * hd * d + d * heads * hd + 3 * cfg.intermediate_size * d  # weights, elements
    flops = cfg.loops * (2 * batch * per_loop + 4 * batch * heads * hd * c) + 2 * batch * d * cfg.vocab_size
    caches = 2 * batch * c * kv * hd * elt
    for provider in ("eager", "fused"):
        counter = R.Counter()
        R.run_lm_step(provider, R.LM_DECODE, batch, counter, cfg=cfg)
        assert sum(op.flops for op in counter.ops) == flops, provider
        floor = cfg.loops * (per_loop * elt + caches) + d * cfg.vocab_size * elt
        assert floor < sum(op.bytes for op in counter.ops) < 2 * floor, provider
        if provider == "fused":
            attention = [op for op in counter.ops if op.name == "trm.kv_cache_attention"]
            qkv, out = batch * (heads + 2 * kv) * hd * elt, batch * heads * hd * elt
            tables = 2 * c * hd * elt  # cos and sin, cast with the model
            assert [op.bytes for op in attention] == [qkv + caches + 4 * batch + tables + out] * cfg.loops
            assert [op.launches for op in attention] == [3] * cfg.loops
    report = R.run(configs=(R.LM,), gpus=("h100",))
    decode = [s for s in report["steps"] if s["step"] == R.LM_DECODE]
    assert {s["batch"] for s in decode} == set(R.LM_BATCHES) and len(decode) == len(R.LM_BATCHES) * len(R.PROVIDERS)
    one = next(s for s in decode if s["batch"] == 1)
    assert one["tokens_per_s"] == pytest.approx(1 / (one["us"] * 1e-6))
    assert "recurrent-depth, decode step" in R.markdown(report)


def test_saved_bytes_count_each_saved_storage_once_and_no_parameters():
    x = torch.randn(4, 8, requires_grad=True) * 1  # an activation (not a leaf)
    w = torch.nn.Parameter(torch.randn(16, 8))
    with R.SavedBytes() as saved:
        torch.nn.functional.linear(x, w)  # saves x and w: w is a parameter
        x * x  # saves x twice: the same storage
        x[1:].exp()  # saves its output
    assert saved.bytes == 4 * 8 * 4 + 3 * 8 * 4


def test_the_report_holds_each_training_step_against_its_floor_and_what_it_saves():
    report = R.run(configs=("sudoku-mlp",), gpus=("h100-measured",), batches=(64,))
    eager = R._find(report, config="sudoku-mlp", step="train", batch=64, provider="eager", gpu="h100-measured")
    fused = R._find(report, config="sudoku-mlp", step="train", batch=64, provider="fused", gpu="h100-measured")
    flops = sum(op.flops for op in R.count_step("sudoku-mlp", "eager", "train", 64))
    assert eager["floor_us"] == fused["floor_us"] == pytest.approx(flops / R.GPUS["h100-measured"].bf16 * 1e6)
    assert fused["x_floor"] == pytest.approx(fused["us"] / fused["floor_us"])
    (saved,) = report["saved_for_backward"]
    assert saved["batch"] == 64 and 0 < saved["fused_bytes"] < saved["eager_bytes"]
    assert "saved for backward: eager / fused" in R.markdown(report)
