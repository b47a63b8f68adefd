"""The benchmark command end to end on small shapes, and CPU timings under pytest-benchmark."""

import json
import os
import subprocess
import sys

import pytest
import torch
import trm_kernels as K
from trm_benchmarks import breakdown, common, model, report, run, targets
from trm_benchmarks.common import Results, Row

from trm.config import ModelConfig, preset
from trm.losses import act_loss
from trm.model import TRM


def test_benchmark_command_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    quick = model.configs(quick=True)[:1]
    quick[0] = (*quick[0][:3], [1])
    monkeypatch.setattr(model, "configs", lambda quick_, names=None: quick)
    run.main(["--out", str(tmp_path), "--quick", "--no-compile", "--profile"])
    data = json.loads((tmp_path / "results.json").read_text())
    groups = {r["group"] for r in data["rows"]}
    assert {"add+rmsnorm forward", "swiglu backward", "attention forward", "training step"} <= groups
    cache = {r["provider"] for r in data["rows"] if r["group"] == "kv-cache attention"}
    assert cache == {"eager", "triton", "sdpa (no rope, no cache write)"}  # a decode step and a prefill chunk
    qk_norm = {r["provider"] for r in data["rows"] if r["group"] == "attention + QK-norm forward+backward"}
    assert qk_norm == {"eager", "triton", "triton, no QK-norm (the floor)"}
    mlp_t = {r["provider"] for r in data["rows"] if r["group"] == "mlp_t sub-layer forward+backward"}
    assert mlp_t == {"eager", targets.AUTO_MLP, targets.TOKEN_COMPOSED, targets.TOKEN_FUSED}
    assert data["ceilings"]["copy_gbps"] > 0 and data["environment"]["torch"] == torch.__version__
    providers = {r["provider"] for r in data["rows"] if r["group"] == "add+rmsnorm forward"}
    assert {"eager", "triton"} <= providers  # the interpreter runs the fused kernels on CPU
    lm = {r["provider"]: r["extra"]["backend"] for r in data["rows"] if r["case"].startswith("recurrent-depth LM")}
    # another recursive model, timed as its own config; on a CPU its fused row says what ran
    assert lm == {"plain PyTorch": "none (plain PyTorch)", "trm_kernels.nn (triton interpreter)": "triton interpreter"}
    fused = [r for r in data["rows"] if r["provider"] == "fused"]
    assert fused and all(r["extra"]["backend"] == "triton interpreter" for r in fused)
    # the training step of eager and fused is profiled: matrix products and our ops are found by name
    profiles = {p["provider"]: p for p in data["profiles"]}
    assert set(profiles) == {"eager", "fused"}
    assert profiles["eager"]["categories"]["GEMM"] > 0 and profiles["fused"]["categories"]["add+rmsnorm"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| case | provider | ms | batch | tokens/s | TFLOP/s | % GEMM |" in md
    assert "## where the time of a training step goes" in md and "## targets" in md
    assert "| case | provider | ms | GB/s | % copy | vs eager |" in md
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "ceiling.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU without the Triton interpreter")
def test_a_quick_run_on_a_cpu_without_the_interpreter_runs_the_fused_rows_on_the_reference(tmp_path, monkeypatch):
    """Before: `--quick --only lm` (and `--quick`) died on a CPU: `ValueError: h is on cpu: the
    triton backend needs CUDA tensors`, the recurrent-depth LM's fused row forced onto triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "trm_benchmarks.run", "--out", str(tmp_path), "--quick", "--only", "lm",
            "--no-compile"]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["provider"]: r["extra"]["backend"] for r in rows} == {
        "plain PyTorch": "none (plain PyTorch)",
        "trm_kernels.nn (reference)": "reference",
    }
    assert "trm_kernels.nn (reference)" in proc.stdout and "trm_kernels backend: reference" in proc.stdout
    monkeypatch.delenv(
        "TRITON_INTERPRET", raising=False
    )  # the model part: no "fused" rows, which would be eager's again
    assert model._providers(torch.device("cpu"), False) == [model.Provider("eager", "reference")]


def _results(device: str, rows: list[Row]) -> Results:
    env = {"device": device, "date": "2026-11-23", "torch": "2.11", "triton": "3.6", "cuda": "13.0"}
    return Results(env, {"copy_gbps": 3000.0, "gemm_tflops": 800.0}, rows)


def test_runs_merge_into_one_table_and_mismatched_devices_are_refused(tmp_path):
    eager = Row("training step (largest batch)", "maze", "eager", 100.0, tflops=200.0, extra={"batch": 192})
    ours = Row("training step (largest batch)", "maze", "fused", 150.0, tflops=400.0, extra={"batch": 576})
    norm = Row("add+rmsnorm forward", "n", "eager", 0.5, gbps=1500.0)
    report.write_results(tmp_path / "a", _results("H100", [eager, norm]))
    b = _results("H100", [ours])
    b.skipped.append({"group": "training step", "case": "maze B=768", "provider": "fused", "reason": "out of memory"})
    report.write_results(tmp_path / "b", b)
    run.main(["--out", str(tmp_path / "all"), "--merge", str(tmp_path / "a"), str(tmp_path / "b")])
    merged = common.read_results(tmp_path / "all")
    assert [r.provider for r in merged.rows] == ["eager", "eager", "fused"] and len(merged.skipped) == 1
    # batches differ in a batch search: compared by throughput, 576/150 over 192/100 = 2x
    assert common.vs_eager(ours, merged.rows) == pytest.approx(2.0)
    md = (tmp_path / "all" / "results.md").read_text()
    assert "| maze | fused | 150.0 | 576 | 400.0 | 50% | 2.00x |" in md and "maze B=768, fused: out of memory" in md
    report.write_results(tmp_path / "c", _results("H200", [norm]))
    with pytest.raises(SystemExit):
        run.main(["--out", str(tmp_path / "x"), "--merge", str(tmp_path / "a"), str(tmp_path / "c")])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a benchmark results file"):
        common.read_results(tmp_path / "bad.json")


def test_unknown_model_config_is_refused():
    with pytest.raises(SystemExit):
        run.main(["--out", "/nonexistent", "--configs", "sudoku-mlp,sudoku-xl"])


def test_largest_batch_fits_a_line_through_peak_memory_and_backs_off(monkeypatch):
    """Peak memory 2 GiB + 0.1 GiB per sample on a 80 GiB device that has 70 GiB usable:
    the line through the 64 and 128 probes predicts (0.92 * 80 - 2) / 0.1 -> 704; the run
    at 704 is out of memory, so 15% less (576, a multiple of 32) is run."""
    runs = []

    def fake_case(name, cfg, batch, device, provider, gemm, case=None):
        runs.append(batch)
        if 2 + 0.1 * batch > 70:
            raise torch.OutOfMemoryError("CUDA out of memory")
        row = Row("training step", case or f"{name} B={batch}", provider.name, float(batch),
                  extra={"batch": batch, "peak_gib": 2 + 0.1 * batch})  # fmt: skip
        return row, None

    monkeypatch.setattr(model, "_train_case", fake_case)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 2**30))
    row = model._largest_batch("maze", None, torch.device("cpu"), model.Provider("eager", "reference"), 1.0, [],
                               lambda text: None)  # fmt: skip
    assert runs == [64, 128, 704, 576]
    assert (row.group, row.case, row.extra["batch"]) == ("training step (largest batch)", "maze", 576)
    # a measured step counts as one of the two points: one probe only
    runs.clear()
    measured = [Row("training step", "maze B=192", "eager", 1.0, extra={"batch": 192, "peak_gib": 2 + 19.2})]
    model._largest_batch("maze", None, torch.device("cpu"), model.Provider("eager", "reference"), 1.0, measured,
                         lambda text: None)  # fmt: skip
    assert runs == [64, 704, 576]


def test_kernel_names_fall_into_categories():
    assert breakdown.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert breakdown.category("nvjet_tst_128x64_64x8_1x2_h_bz_TNT") == "GEMM"
    assert breakdown.category("_attn_bwd_dkdv") == "attention"
    assert breakdown.category("add_rmsnorm_fwd_kernel<__nv_bfloat16, 4>") == "add+rmsnorm"
    assert breakdown.category("_swiglu_fwd") == "swiglu"
    assert breakdown.category("_token_mlp_rmsnorm_fwd") == "mlp_t sub-layer (fused)"
    assert breakdown.category("triton_poi_fused_add_mul_0") == "inductor (torch.compile)"
    assert breakdown.category("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise, copies"


def test_flop_count_of_a_training_step():
    cfg = ModelConfig(vocab_size=11, seq_len=81, hidden_size=512, mlp_t=False, puzzle_emb_len=16, T=3, n=6)
    tokens = 97
    per_call = 2 * (2 * tokens * 512 * (3 * 512 + 512 + 3 * 1536) + 4 * tokens * tokens * 512)
    head = 2 * 97 * 512 * 11 + 2 * 512 * 2  # every position (puzzle-embedding ones too), and the halting head
    assert model.step_flops(cfg, 1, train=False) == per_call * 21 + head
    assert model.step_flops(cfg, 1, train=True) == per_call * 21 + head + 2 * (per_call * 7 + head)


def _tiny():
    cfg = ModelConfig(vocab_size=6, seq_len=16, hidden_size=64, num_heads=2, mlp_t=True, puzzle_emb_len=1,
                      T=2, n=2, n_sup=4)  # fmt: skip
    torch.manual_seed(0)
    batch = {"inputs": torch.randint(1, 6, (32, 16)), "labels": torch.randint(1, 6, (32, 16)),
             "puzzle_identifiers": torch.zeros(32, dtype=torch.long)}  # fmt: skip
    return TRM(cfg), batch


def test_cpu_training_step_time(benchmark):
    net, batch = _tiny()
    carry = net.initial_carry(batch)

    def step():
        new, out = net(carry, batch)
        loss, _ = act_loss(out, new)
        loss.backward()

    benchmark(step)


def test_cpu_full_solve_time(benchmark):
    net, batch = _tiny()
    net.eval()
    benchmark(lambda: list(net.solve(batch)))


def test_targets_are_checked_against_the_run():
    rows = [
        Row("add+rmsnorm forward", "add_rmsnorm hidden 768x97x512", "eager", 2.125, gbps=1200.0),
        Row("add+rmsnorm forward", "add_rmsnorm hidden 768x97x512", "triton", 1.109, gbps=2300.0),
        Row("add+rmsnorm forward", "add_rmsnorm hidden 768x97x512", "cuda", 1.0, gbps=2550.0),
        Row("add+rmsnorm backward", "add_rmsnorm hidden 768x97x512", "triton", 1.0, gbps=1800.0),
        Row("attention forward+backward", "S=97", "triton", 2.0, tflops=1.0),
        Row("attention forward+backward", "S=97", "sdpa-flash_attention (no rope)", 2.5, tflops=1.0),
        Row("attention forward+backward", "S=97", "sdpa-cudnn_attention (no rope)", 1.5, tflops=1.0),
        Row("training step", "sudoku-mlp B=768", "eager", 300.0, tflops=100.0, extra={"batch": 768, "peak_gib": 30}),
        Row("training step", "sudoku-mlp B=768", "torch.compile reduce-overhead", 131.0, extra={"batch": 768}),
        Row(
            "training step",
            "sudoku-mlp B=768",
            "fused + CUDA graphs",
            100.0,
            tflops=380.0,
            extra={"batch": 768, "peak_gib": 20},
        ),  # fmt: skip
        Row("swiglu_mlp forward", "74496x512", targets.AUTO_MLP, 1.02, tflops=1.0),
        Row("swiglu_mlp forward", "74496x512", "cuBLAS + triton swiglu", 1.0, tflops=1.0),
        Row("swiglu_mlp forward", "74496x512", "triton GEMM epilogues", 1.2, tflops=1.0),
        Row("swiglu_mlp backward", "74496x512", targets.AUTO_MLP, 2.0, tflops=1.0),
        Row("swiglu_mlp backward", "74496x512", "cuBLAS + triton swiglu", 1.5, tflops=1.0),
        Row("swiglu_mlp backward", "74496x512", "triton GEMM epilogues", 1.8, tflops=1.0),
        Row("mlp_t sub-layer forward+backward", "h 768x97x512, I=512", targets.AUTO_MLP, 3.0, tflops=1.0),
        Row("mlp_t sub-layer forward+backward", "h 768x97x512, I=512", targets.TOKEN_COMPOSED, 3.0, tflops=1.0),
        Row("mlp_t sub-layer forward+backward", "h 768x97x512, I=512", targets.TOKEN_FUSED, 2.0, tflops=1.0),
        Row("evaluation (full solve)", "sudoku-mlp B=1", "eager", 50.0, extra={"batch": 1}),
        Row("evaluation (full solve)", "sudoku-mlp B=1", "fused + CUDA graphs", 5.0, extra={"batch": 1}),
    ]
    checks = {(c.target, c.case): c for c in targets.check(_results("H100", rows))}

    def met(target, case):
        return checks[(target, case)].met

    assert met("add+rmsnorm forward >= 80% of copy", "add_rmsnorm hidden 768x97x512")  # cuda: 85%
    assert checks[("add+rmsnorm forward >= 80% of copy", "add_rmsnorm hidden 768x97x512")].measured == "85% (cuda)"
    assert met("add+rmsnorm backward >= 70% of copy", "add_rmsnorm hidden 768x97x512") is False  # 60%
    assert met("attention forward+backward: faster than the fastest SDPA", "S=97") is False  # cuDNN's 1.5 ms
    assert met("training step: ours >= 2.0x eager", "sudoku-mlp B=768")  # 3x
    assert met("training step: ours >= 1.3x torch.compile reduce-overhead", "sudoku-mlp B=768")  # 1.31x
    assert met("training step: ours >= 2.0x eager", "maze B=768") is None  # not in the run: never "met"
    assert met("training step MFU >= 45%", "sudoku-mlp B=768")  # 380 / 800
    assert met("training peak memory <= eager's", "sudoku-mlp B=768")
    assert met("evaluation (full solve): ours >= 5.0x eager", "sudoku-mlp B=1")  # 10x
    assert met("swiglu_mlp forward: the timed choice within 5% of the faster candidate", "74496x512")  # 1.02x
    assert met("swiglu_mlp backward: the timed choice within 5% of the faster candidate", "74496x512") is False
    mlp_t = "mlp_t sub-layer forward+backward: the timed choice within 5% of the faster candidate"
    assert met(mlp_t, "h 768x97x512, I=512") is False  # kept the composition, 1.5x the fused kernels' time
    md = report.markdown(_results("H100", rows))
    assert "| training step: ours >= 2.0x eager | maze B=768 |  | not measured |" in md


def test_hrm_and_trm_step_times_side_by_side():
    rows = [Row("training step", f"{config} B=768", provider, ms)
            for provider, times in (("eager", (300.0, 200.0, 800.0)), ("fused + CUDA graphs", (100.0, 80.0, 240.0)))
            for config, ms in zip(("sudoku-mlp", "sudoku-att", "hrm-sudoku"), times, strict=True)]  # fmt: skip
    md = report.markdown(_results("H100", rows))
    assert "| eager | 300.0 | 200.0 | 800.0 | 4.00x |" in md
    assert "| fused + CUDA graphs | 100.0 | 80.0 | 240.0 | 3.00x |" in md
    assert targets.hrm_vs_trm(_results("H100", rows[:2])) == []  # no HRM measured: no table


@pytest.mark.skipif("triton" not in K.available("token_mlp_rmsnorm"), reason="needs triton")
@pytest.mark.parametrize("evaluate", [False, True])
def test_traffic_census_per_batch_element(evaluate):
    """The byte census of one step: weights cancel (per batch element), views count nothing,
    and the fused ops move fewer bytes than the reference, the mlp_t sub-layer as one kernel
    without grad (all of evaluation, the no-grad cycles of training)."""
    from trm_benchmarks import traffic

    cfg = ModelConfig(vocab_size=7, seq_len=30, hidden_size=64, num_heads=2, puzzle_emb_len=2, T=2, n=2, n_sup=2,
                      num_puzzle_identifiers=1, mlp_t=True, forward_dtype="float32")  # fmt: skip
    torch.manual_seed(0)
    model = TRM(cfg)
    tables = {}
    for backend in ("reference", "triton"):
        with K.use_backend(backend):
            tables[backend] = traffic.per_element(model, evaluate, torch.device("cpu"))
    fused, ref = tables["triton"], tables["reference"]
    assert "aten.t" not in ref and "aten.expand" not in ref and "aten.detach" not in fused
    assert fused["trm.token_mlp_rmsnorm"] > 0
    if evaluate:
        # per mixer call: h read and the output written, 2 * S * D fp32 values; 2 layers x T * (n + 1) calls
        assert fused["trm.token_mlp_rmsnorm"] == 2 * 2 * 3 * (2 * 32 * 64 * 4)
        # the channel MLP sub-layer: its two GEMM kernels, the activation crossing memory between them
        assert "trm.swiglu" not in fused and "trm.swiglu_mlp: gate|up GEMM + SwiGLU" in fused
    assert sum(fused.values()) < 0.6 * sum(ref.values())


def test_adaptive_rows_compare_halting_with_fixed_steps_on_the_runs_test_puzzles(tmp_path):
    """A (random, so halting early) sudoku4-sized model and its dataset: one halting and one
    fixed-step row per batch, on the same puzzles; the fixed row's accuracy is trm.evaluate's."""
    from trm.arch import build_model
    from trm.config import RunConfig
    from trm.data import dataset
    from trm.data.store import load_split
    from trm.evaluate import evaluate, write_model_checkpoint

    cfg = preset("sudoku4")
    cfg.data.num_train, cfg.data.num_test = 8, 12
    data = dataset.build(cfg.data, tmp_path / "data")
    dataset.configure_model(cfg, data)
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.n_sup, cfg.model.T, cfg.model.n = 32, 2, 3, 1, 1
    torch.manual_seed(0)
    net = build_model(cfg.model)
    run = tmp_path / "run"
    run.mkdir()
    write_model_checkpoint(net.state_dict(), RunConfig.from_dict(cfg.to_dict()), data, run / "checkpoint.safetensors")
    rows = model.adaptive_rows(run, torch.device("cpu"), batches=(5, 1), puzzles=10)
    assert [(r.case, r.provider) for r in rows] == [
        (f"run B={b}", f"eager, {mode}") for b in (5, 1) for mode in ("halting", "fixed 3 steps")
    ]
    split = load_split(data, "test")
    head = type(split)(split.inputs[:10], split.labels[:10], split.puzzle_identifiers[:10])
    want = evaluate(net.eval(), head, 10)["exact_accuracy"]
    for r in rows:
        assert r.extra["puzzles"] == 10 and r.extra["puzzles_per_s"] > 0 and 1 <= r.extra["steps_mean"] <= 3
        if "fixed" in r.provider:
            assert r.extra["exact_accuracy"] == want


def test_a_gpu_run_times_the_fused_ops_inside_torch_compile_too():
    if "triton" not in K.available("add_rmsnorm"):
        pytest.skip("triton is not installed")
    providers = {p.name: p for p in model._providers(torch.device("cuda"), compile_ok=True)}
    compiled = providers["fused + torch.compile"]
    assert compiled.backend == "auto" and compiled.compile_kwargs == {} and not compiled.graphs
    assert "fused + torch.compile" not in {p.name for p in model._providers(torch.device("cuda"), compile_ok=False)}
