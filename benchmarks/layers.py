"""Expert layers side by side: time, FLOP floor and memory of one FFN layer, d = 768, d_ff = 3072 (T5-base).

    python benchmarks/layers.py [--tokens 1024 4096 16384] [--device cpu|cuda] [--precision fp32|bf16]
                                [--repeats 5] [--warm-up 2] [--out BENCHMARKS.md] [--json results.json]
                                [--malloc keep|system] [--profile LAYER ...] [--state]

Layers, all upcycled from the same random dense FFN (ReLU, no bias, as T5 v1.0) and built from the method configs
of conf/method/: the dense FFN; transformers' `SwitchTransformersSparseMLP` (reference; 8 experts, capacity
1.25, jitter 0.01, fp32 router); ours: switch, moe (top-2), mpoe (n = 8, m = 5, the paper's factorization),
mpoe++ (n = 16), cartesian (CartesianMoE, 2 x 8 half-width sub-experts, 2 choices each) and meo (MEO, 8 experts,
top-2 merged per sequence, as in an encoder). Inputs are sequences of --seq-len tokens (MEO merges per sequence;
the reference counts capacity per sequence, ours over the call).

Per layer and token count, in training mode: forward, forward+backward; in evaluation mode (no_grad): forward,
where MPO experts come from their cache. Each time is the median of --repeats runs after --warm-up untimed runs,
the layers interleaved run by run so that drift on a shared machine hits all of them alike. Ratios are to the dense
FFN of the same run. The analytic floor of a layer is its arithmetic, FLOPs = 2 x multiply-adds: the tokens' FFN matmuls
(2 per choice for top-2) and the router, plus for MPO experts the reconstruction of every expert matrix
(mpo.contraction_macs) and for MEO the merge (k |W| multiply-adds per matrix and sequence), x 3 for
forward+backward: the physical floor, at the dense FFN's measured FLOP rate, and "/physical" the layer's time over
it. Layers that recompute their experts (matrices and FFN) in backward (method.recompute, the MPO methods' default,
a memory-for-time choice) do one more forward of them ("recompute GFLOP"); "/(physical + recompute)" is the time
over the floor with that work added. mpoe and mpoe++ are measured both ways ("mpoe no-recompute": recompute off).
"counted fwd" is what torch's FLOP counter sees in one forward (matmuls, grouped matmuls included), a check on
the analytic figure. Memory: on CUDA the peak allocated during forward+backward; on CPU the bytes
autograd saves for backward (what a checkpoint would not store). `--precision bf16` runs every layer under bf16
autocast, as training with train.precision=bf16 does (fp32 weights, bf16 matmuls); the floor is then at the dense
FFN's bf16 rate. `--json` writes the numbers, for benchmarks/gpu_check.sh's summary.

`--profile LAYER ...` also profiles those layers' forward+backward (torch.profiler, 3 steps after 2 warm-up
steps) at each token count and prints, per layer, its top operators by self time, the share of time in matrix
products and the rate at which they run: where a layer's time goes when it is above its floor.

On CPU, `--malloc keep` has glibc keep freed memory for reuse, as training with `cpu_malloc=keep` does
(mpoe_exp/cpu_malloc.py); the default, `system`, is glibc's own policy, which page-faults every tensor above 32 MB
afresh on each use.

`--state` also reports the training state (parameters, gradients, AdamW moments) of whole t5-base models per method,
from the tensors AdamW creates, on the meta device (same shapes and dtypes as on a GPU, no memory needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from mpoe_exp import compose_config, cpu_malloc, mpo
from mpoe_exp.config import run_spec
from mpoe_exp.moe import FeedForwardSpec, MergedExpertsFeedForward, MPOExperts, build_layer

D_MODEL, D_FF = 768, 3072
OURS = ("switch", "moe", "mpoe", "mpoe++", "cartesian", "meo")
REFERENCE = "SwitchTransformersSparseMLP"
NO_RECOMPUTE = ("mpoe", "mpoe++")  # also measured with method.recompute=false, as "<name> no-recompute"
NO_RECOMPUTE_SUFFIX = "no-recompute"


def method_config(name: str) -> dict:
    return OmegaConf.to_container(compose_config(["model=t5-base", f"method={name}"]).method, resolve=True)


def build_layers(device: torch.device) -> dict[str, nn.Module]:
    """The dense FFN, the transformers reference and our layers, from one random dense FFN."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(D_MODEL, D_FF, bias=False), nn.ReLU(), nn.Linear(D_FF, D_MODEL, bias=False))
    weights = {"wi": dense[0].weight.detach(), "wo": dense[2].weight.detach()}
    spec = FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="relu")
    layers: dict[str, nn.Module] = {"dense": dense}
    switch = method_config("switch")
    reference = SwitchTransformersSparseMLP(
        SwitchTransformersConfig(
            d_model=D_MODEL, d_ff=D_FF, num_experts=switch["num_experts"], expert_capacity=1, dropout_rate=0.0,
            router_jitter_noise=switch["router"]["jitter"], router_dtype="float32", router_bias=True,
        )
    )  # fmt: skip
    with torch.no_grad():
        for expert in reference.experts.values():
            expert.wi.weight.copy_(weights["wi"])
            expert.wo.weight.copy_(weights["wo"])
    layers[REFERENCE] = reference
    for name in OURS:
        layers[name] = build_layer(spec, method_config(name), weights, {})
    for name in NO_RECOMPUTE:  # the MPO methods recompute their matrices in backward by default; also without
        layers[f"{name} {NO_RECOMPUTE_SUFFIX}"] = build_layer(
            spec, {**method_config(name), "recompute": False}, weights, {}
        )
    return {name: layer.to(device) for name, layer in layers.items()}


def set_reference_capacity(layer: nn.Module, seq_len: int) -> None:
    """The reference counts capacity per sequence (ours per call: the same arithmetic, another drop rule)."""
    factor = method_config("switch")["router"]["capacity_factor_train"]
    layer.router.expert_capacity = math.ceil(factor * seq_len / layer.router.num_experts)


# --- FLOPs -------------------------------------------------------------------------------------------------------


def reconstruction_flops(layer: nn.Module) -> float:
    """Forward FLOPs of contracting every expert matrix of an MPO layer (0 for other layers)."""
    experts = getattr(layer, "experts", None)
    if not isinstance(experts, MPOExperts):
        return 0.0
    macs = sum(mpo.contraction_macs(*experts.factorizations[n], experts.max_bond) for n in experts.spec.matrix_names)
    return 2.0 * experts.num_experts * macs


def merge_flops(layer: nn.Module, sequences: int) -> float:
    """Forward FLOPs of MEO's merge: k matrices weighted and summed, per matrix and sequence (0 for other layers)."""
    if not isinstance(layer, MergedExpertsFeedForward) or not layer.per_sequence:
        return 0.0
    return 2.0 * sequences * layer.router.top_k * sum(m[0].numel() for m in layer.experts.matrices.values())


def forward_flops(name: str, layer: nn.Module, tokens: int, sequences: int = 1, *, cached: bool = False) -> float:
    """Forward FLOPs of the layer on `tokens` tokens in `sequences` sequences (every token kept)."""
    ffn = 2.0 * tokens * 2 * D_MODEL * D_FF
    if name == "dense":
        return ffn
    if name == "cartesian":  # two sub-layers, each 2 half-width sub-experts per token and a router
        return 2 * ffn + 2 * 2.0 * tokens * D_MODEL * layer.a.num_experts
    if name == "meo":  # one merged FFN per token, the router on sequence means, the merge
        return ffn + 2.0 * sequences * D_MODEL * layer.num_experts + merge_flops(layer, sequences)
    num_experts = layer.router.num_experts if name == REFERENCE else layer.num_experts
    choices = 2 if name == "moe" else 1
    router = 2.0 * tokens * D_MODEL * num_experts
    return choices * ffn + router + (0.0 if cached else reconstruction_flops(layer))


def register_missing_flop_formula(op) -> Callable:
    """Decorator: `register_flop_formula(op)` unless torch's counter already has a formula for `op` (a later torch
    may ship its own; registering twice is an error at import), in which case torch's is kept."""

    def register(formula: Callable) -> Callable:
        if op not in flop_registry:
            register_flop_formula(op)(formula)
        return formula

    return register


@register_missing_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's FLOP counter has no formula for grouped matmuls: every row of `a` meets one group's matrix."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (M, K) x (G, K, N)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (K, M) x (M, N) -> (G, K, N): weight gradients
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(a_shape) * b_shape[-1]  # 3D x 3D (or 3D x 2D): batched


@register_missing_flop_formula(torch.ops.aten.addmm_)
def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Nor for addmm_, with which the experts add their weight gradients in place under gradient accumulation."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def backward_flops(name: str, layer: nn.Module, tokens: int, sequences: int = 1) -> float:
    """FLOPs of the layer's backward: twice its forward, plus, where it recomputes its experts in backward
    (method.recompute: mpoe's default), their matrices and FFN once more (the router is not recomputed)."""
    forward = forward_flops(name, layer, tokens, sequences)
    if not getattr(layer, "recompute", False):
        return 2 * forward
    router = 2.0 * tokens * D_MODEL * layer.num_experts
    return 2 * forward + forward - router


def counted_forward_flops(layer: nn.Module, x: torch.Tensor) -> int:
    """FLOPs torch's counter sees in one training-mode forward."""
    with FlopCounterMode(display=False) as counter:
        layer.train()
        layer(x.clone())
    return counter.get_total_flops()


# --- measuring ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def saved_for_backward_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.clone())
    return sum(seen.values())


def autocast(device: torch.device, precision: str):
    """bf16 autocast (as train.precision=bf16), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure(
    layers: dict[str, nn.Module],
    tokens: int,
    device: torch.device,
    repeats: int,
    seq_len: int = 512,
    precision: str = "fp32",
    warm_up: int = 2,
) -> dict[str, dict]:
    torch.manual_seed(1)
    seq_len = min(seq_len, tokens)
    sequences = tokens // seq_len
    x = torch.randn(sequences, seq_len, D_MODEL, device=device, requires_grad=True)
    if REFERENCE in layers:
        set_reference_capacity(layers[REFERENCE], seq_len)

    def forward(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.train()
            with autocast(device, precision):
                layer(x.clone())

        return run

    def forward_backward(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.train()
            with autocast(device, precision):
                out = layer(x.clone())  # clone: the reference jitters its input in place
            out.float().sum().backward()
            for p in layer.parameters():
                p.grad = None
            x.grad = None

        return run

    def evaluation(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.eval()
            with torch.no_grad(), autocast(device, precision):
                layer(x)

        return run

    results: dict[str, dict] = {name: {} for name in layers}
    for kind, make in (("forward", forward), ("forward_backward", forward_backward), ("eval", evaluation)):
        times: dict[str, list[float]] = {name: [] for name in layers}
        for run in range(warm_up + repeats):
            for name, layer in layers.items():
                if device.type == "cuda" and kind == "forward_backward" and run == warm_up + repeats - 1:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    times[name].append(timed(make(layer), device))
                    results[name]["peak_memory"] = torch.cuda.max_memory_allocated(device) - base
                else:
                    times[name].append(timed(make(layer), device))
        for name in layers:
            results[name][kind] = statistics.median(times[name][warm_up:])
    for name, layer in layers.items():
        layer.train()
        with autocast(device, precision):
            if device.type != "cuda":
                results[name]["saved_bytes"] = saved_for_backward_bytes(layer, x)
            results[name]["counted_fwd"] = counted_forward_flops(layer, x)
        results[name]["flops_fwd"] = forward_flops(name, layer, tokens, sequences)
        results[name]["flops_fb"] = results[name]["flops_fwd"] + backward_flops(name, layer, tokens, sequences)
        results[name]["flops_physical"] = 3 * results[name]["flops_fwd"]  # forward + backward, nothing recomputed
    return results


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per layer: forward+backward time over the dense FFN's, over its physical floor (its arithmetic with nothing
    recomputed) and over that floor plus what it recomputes in backward, both at the dense FFN's rate."""
    dense = results["dense"]
    rate = dense["flops_fb"] / dense["forward_backward"]
    return {
        name: {
            "x_dense": r["forward_backward"] / dense["forward_backward"],
            "x_physical": r["forward_backward"] / (r["flops_physical"] / rate),
            "x_floor": r["forward_backward"] / (r["flops_fb"] / rate),
            "recompute_gflop": (r["flops_fb"] - r["flops_physical"]) / 1e9,
            "fwd_bwd_ms": r["forward_backward"] * 1e3,
        }
        for name, r in results.items()
    }


def table(all_results: dict[int, dict[str, dict]], device: torch.device) -> str:
    memory = "peak MB (fwd+bwd)" if device.type == "cuda" else "saved for bwd MB"
    lines = [
        "| tokens | layer | fwd ms | fwd+bwd ms | x dense | GFLOP fwd | counted fwd | GFLOP fwd+bwd "
        "| physical floor ms | /physical | recompute GFLOP | /(physical + recompute) | eval ms | eval x switch "
        f"| {memory} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens, results in all_results.items():
        switch_eval = results["switch"]["eval"] if "switch" in results else math.nan
        for name, (r, x) in {n: (r, ratios(results)[n]) for n, r in results.items()}.items():
            mem = r.get("peak_memory", r.get("saved_bytes", 0)) / 2**20
            lines.append(
                f"| {tokens} | {name} | {r['forward'] * 1e3:.1f} | {r['forward_backward'] * 1e3:.1f} | "
                f"{x['x_dense']:.2f} | {r['flops_fwd'] / 1e9:.1f} | {r['counted_fwd'] / 1e9:.1f} | "
                f"{r['flops_physical'] / 1e9:.1f} | {x['fwd_bwd_ms'] / x['x_physical']:.1f} | {x['x_physical']:.2f} | "
                f"{x['recompute_gflop']:.1f} | {x['x_floor']:.2f} | {r['eval'] * 1e3:.1f} | "
                f"{r['eval'] / switch_eval:.2f} | {mem:.0f} |"
            )
    return "\n".join(lines)


# --- profiles ----------------------------------------------------------------------------------------------------

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::_grouped_mm")


def self_times(events, cuda: bool) -> dict[str, float]:
    """{operator: self time in µs} of profiler events: CPU time on CPU; on CUDA the device time of the aten operators
    only, each of which carries the time of the kernels it launched (the kernels' own events, also listed, would
    count that time twice)."""
    if cuda:
        return {
            e.key: e.self_device_time_total
            for e in events
            if e.key.startswith("aten::") and e.self_device_time_total > 0
        }
    return {e.key: e.self_cpu_time_total for e in events if e.self_cpu_time_total > 0}


def profile_table(
    layer: nn.Module,
    name: str,
    tokens: int,
    device: torch.device,
    seq_len: int = 512,
    top: int = 8,
    precision: str = "fp32",
) -> str:
    """Top operators of the layer's forward+backward by self time (3 steps after 2 warm-up steps), ms per step, and
    the rate of its matrix products (FLOPs counted in the first warm-up step over their time), under the autocast
    of `precision` as the timed runs. On CUDA also the host's time in operators per step: where it exceeds the
    device's, the layer waits on Python and kernel launches, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    seq_len = min(seq_len, tokens)
    x = torch.randn(tokens // seq_len, seq_len, D_MODEL, device=device, requires_grad=True)
    if name == REFERENCE:
        set_reference_capacity(layer, seq_len)
    layer.train()

    def step() -> None:
        with autocast(device, precision):
            out = layer(x.clone())
        out.float().sum().backward()
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    with FlopCounterMode(display=False) as counter:  # the first warm-up step counts the matrix products' FLOPs
        step()
    step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    self_us = {key: t / 3 for key, t in self_times(prof.key_averages(), cuda).items()}
    total = sum(self_us.values())
    in_matmuls = sum(t for k, t in self_us.items() if k in MATMULS)
    host = ""
    if cuda:
        host_us = sum(e.self_cpu_time_total for e in prof.key_averages()) / 3
        host = f"; the host spends {host_us / 1e3:.1f} ms per step in operators (launches included)"
    lines = [
        f"Profile of {name}, {tokens} tokens, {precision}, forward+backward ({'device' if cuda else 'CPU'} self time, "
        f"ms per step): {total / 1e3:.1f} ms, {100 * in_matmuls / total:.0f}% in matrix products, which run at "
        f"{counter.get_total_flops() / in_matmuls / 1e3:.0f} GFLOP/s{host}",
        "",
        "| operator | ms | share |",
        "|---|---:|---:|",
    ]
    for key, t in sorted(self_us.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {key} | {t / 1e3:.1f} | {100 * t / total:.0f}% |")
    return "\n".join(lines)


# --- training state of whole models ------------------------------------------------------------------------------


def training_state_bytes(method: str, model: str = "t5-base") -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW moments of a whole model, from the tensors AdamW creates."""
    from mpoe_exp.models import build_model

    cfg = compose_config([f"model={model}", f"method={method}"])
    net, _ = build_model(run_spec(cfg), meta=True)
    params = list({id(p): p for p in net.parameters() if p.requires_grad}.values())
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.step()
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    size = sum(p.numel() * p.element_size() for p in params)
    return {"parameters": size, "gradients": size, "adam_moments": moments, "total": 2 * size + moments}


def state_table(methods: tuple[str, ...] = ("dense", "switch", "mpoe", "mpoe++")) -> str:
    states = {m: training_state_bytes(m) for m in methods}
    lines = [
        "| t5-base method | parameters GB | gradients GB | AdamW moments GB | total GB | x switch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, s in states.items():
        lines.append(
            f"| {m} | {s['parameters'] / 1e9:.2f} | {s['gradients'] / 1e9:.2f} | {s['adam_moments'] / 1e9:.2f} | "
            f"{s['total'] / 1e9:.2f} | {s['total'] / states['switch']['total']:.3f} |"
        )
    return "\n".join(lines)


def machine(device: torch.device, precision: str = "fp32", malloc: str = "system") -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())  # fmt: skip
        what = f"{cpu}, {torch.get_num_threads()} threads, malloc {malloc}"
    return f"{what}; torch {torch.__version__}, {precision}"


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--malloc", choices=("system", "keep"), default="system",
        help="on CPU: system = glibc's default; keep = glibc keeps freed memory, as training with cpu_malloc=keep",
    )  # fmt: skip


def set_malloc(setting: str, device: torch.device) -> str:
    """The runner's `cpu_malloc` for this process; what was applied ("keep" only on CPU with glibc)."""
    kept = device.type == "cpu" and setting == "keep" and cpu_malloc.keep_freed_memory()
    return "keep" if kept else "system"


def main(argv: list[str] | None = None) -> None:
    global D_MODEL, D_FF  # --width: every formula and input below reads them
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (MEO merges per sequence)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: under bf16 autocast")
    parser.add_argument(
        "--width", type=int, nargs=2, default=[D_MODEL, D_FF], metavar=("D_MODEL", "D_FF"),
        help="the layers' shape (t5-base's by default; a small one checks the script quickly, e.g. bf16 on a CPU "
        "without bf16 kernels, where t5-base's MPO contractions take minutes)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warm-up", type=int, default=2, help="untimed runs first (a kept heap grows to its size over a few steps)"
    )
    parser.add_argument("--state", action="store_true", help="also the training state of whole t5-base models")
    parser.add_argument(
        "--profile", nargs="+", default=[], choices=("dense", REFERENCE, *OURS), help="also profile these layers"
    )
    parser.add_argument("--out", help="append the tables to this Markdown file")
    parser.add_argument("--json", help="write the measurements (and ratios) to this JSON file")
    add_malloc_option(parser)
    args = parser.parse_args(argv)
    D_MODEL, D_FF = args.width
    device = torch.device(args.device)
    malloc = set_malloc(args.malloc, device)
    layers = build_layers(device)
    results = {
        tokens: measure(layers, tokens, device, args.repeats, args.seq_len, args.precision, args.warm_up)
        for tokens in args.tokens
    }
    where = machine(device, args.precision, malloc)
    if (D_MODEL, D_FF) != (768, 3072):
        where += f", layers {D_MODEL} x {D_FF}"
    text = f"Layer benchmark on {where}, median of {args.repeats} after {args.warm_up} warm-up runs:\n\n"
    text += f"{table(results, device)}\n"
    for tokens in args.tokens:
        for name in args.profile:
            text += f"\n{profile_table(layers[name], name, tokens, device, args.seq_len, precision=args.precision)}\n"
    if args.state:
        text += f"\nTraining state (parameters + gradients + AdamW moments, fp32):\n\n{state_table()}\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json:
        record = {"machine": where, "precision": args.precision, "tokens": {t: ratios(r) for t, r in results.items()}}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
