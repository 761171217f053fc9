"""End to end: training tokens per second of a T5 (t5-small's or t5-base's shape, random weights) per method.

    python benchmarks/train_throughput.py [--methods dense switch mpoe] [--steps 5] [--warm-up 0] [--batch 8]
                                          [--device cpu|cuda]
                                          [--shape t5-small|t5-base] [--precision fp32|bf16] [--grad-accum 1 8]
                                          [--json out.json] [--malloc keep|system] [--adamw fused|foreach]

Each step is the trainer's `TrainingStep`: the gradient mask draw, forward with labels and the auxiliary losses,
backward, over k micro-batches (`--grad-accum`; MPO experts contracted once per optimizer step), gradient clipping and
the AdamW step. Tokens are the source and target tokens of a step (random ids, source length 128, target length 16).
The methods alternate step by step after a warm-up step each (`--warm-up N`: N more), so drift on a
shared machine hits all alike; the table gives the median step time, tokens/s and the ratio to dense, and on CUDA
the peak memory allocated by each method's steps. The first warm-up step runs under torch's FLOP counter
(`torch.utils.flop_counter`, with benchmarks/layers.py's formula for grouped matmuls), so the table also gives the
arithmetic of a step (forward, backward, recomputation and MPO contraction; not the optimizer) and its ratio to
dense's: the floor that the measured ratio can be read against. The JSON also has each step's forward and backward
passes timed apart (`passes_ms`: the step less its clipping, AdamW update and zeroing of gradients).
`--precision bf16` runs the forward under bf16 autocast, as train.precision=bf16 does. `--malloc keep` has glibc
keep freed memory, as `cpu_malloc=keep` does (benchmarks/layers.py). `--adamw foreach` steps with torch's default
AdamW instead of the trainer's fused one.
Models are built offline from the byte vocabulary of tiny-t5 (no download).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import layers  # also registers the FLOP formula of grouped matmuls
import torch
from torch.utils.flop_counter import FlopCounterMode

from mpoe_exp import compose_config
from mpoe_exp.config import run_spec
from mpoe_exp.gradient_mask import CentralGradientMask
from mpoe_exp.models import build_model
from mpoe_exp.training import TrainingStep, adamw, training_hooks


def t5_shape(d_model: int, d_ff: int, heads: int, layers: int) -> list[str]:
    """tiny-t5 (offline byte vocabulary, random weights) resized to a T5 shape (d_kv 64, ReLU FFN)."""
    arch = "model.architecture"
    return [
        "model=tiny-t5", f"{arch}.d_model={d_model}", f"{arch}.d_ff={d_ff}", f"{arch}.d_kv=64",
        f"{arch}.num_heads={heads}", f"{arch}.num_layers={layers}", f"{arch}.num_decoder_layers={layers}",
    ]  # fmt: skip


SHAPES = {
    "t5-small": t5_shape(512, 2048, 8, 6),
    "t5-base": t5_shape(768, 3072, 12, 12),
    "tiny": ["model=tiny-t5"],  # for tests
}


class Run:
    """One method's model and the trainer's optimizer step (TrainingStep: gradient mask, accumulation, clipping)."""

    def __init__(
        self,
        method: str,
        device: torch.device,
        shape: str = "t5-small",
        precision: str = "fp32",
        overrides: list[str] | None = None,
        optimizer: str = "fused",
    ):
        overrides = [o for o in overrides or [] if method != "dense" or not o.lstrip("+").startswith("method.")]
        cfg = compose_config([*SHAPES[shape], f"method={method}", *overrides])
        torch.manual_seed(0)
        self.model, _ = build_model(run_spec(cfg))
        self.model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if optimizer == "fused":  # the trainer's
            optimizer = adamw(params, lr=1e-4)
        else:  # torch's default implementation
            optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=optimizer == "foreach")
        hooks = training_hooks(self.model)
        self.step_fn = TrainingStep(
            self.model,
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            torch.amp.GradScaler(device.type, enabled=False),
            CentralGradientMask(hooks.central_parameters(), hooks.gradient_mask_prob, seed=0),
            grad_clip=1.0,
            precision=precision,
            device=device,
            encoder_decoder=True,
        )
        self.vocab = cfg.model.architecture.vocab_size
        self.passes_s: list[float] = []  # each step's forward and backward passes (TrainingStep.accumulate)
        self.step_fn.accumulate = self._timed(self.step_fn.accumulate, device)

    def _timed(self, accumulate, device: torch.device):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = accumulate(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.passes_s.append(time.perf_counter() - start)
            return result

        return timed

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over the micro-batches (k of them: gradient accumulation)."""
        self.step_fn(self.model, micro_batches, lambda model, batch: model(**batch).loss)


def add_adamw_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adamw",
        choices=("fused", "foreach"),
        default="fused",
        help="fused: the trainer's AdamW (mpoe_exp.training.adamw); foreach: torch's default, for comparison",
    )


def make_batch(batch: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (batch, 128), generator=g)
    labels = torch.randint(3, vocab, (batch, 16), generator=g)
    batch_dict = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch_dict.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "switch", "mpoe"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--warm-up", type=int, default=0,
        help="untimed steps after the FLOP-counting one (whose allocations differ: a kept heap may still grow)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1], help="micro-batches per optimizer step")
    parser.add_argument("--json", help="write the measurements to this JSON file")
    layers.add_malloc_option(parser)
    add_adamw_option(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    malloc = layers.set_malloc(args.malloc, device)
    runs = {m: Run(m, device, args.shape, args.precision, optimizer=args.adamw) for m in args.methods}
    batch = make_batch(args.batch, next(iter(runs.values())).vocab, device)
    tokens = batch["input_ids"].numel() + batch["labels"].numel()  # per micro-batch
    settings = [(m, k) for k in args.grad_accum for m in runs]
    times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    passes: dict[tuple[str, int], list[float]] = {s: [] for s in settings}  # each step's forward+backward part
    peaks: dict[tuple[str, int], float] = {}
    flops: dict[tuple[str, int], int] = {}
    for warm_up in [True] * (1 + args.warm_up) + [False] * args.steps:
        for method, k in settings:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            if warm_up and (method, k) not in flops:  # not timed: counts the step's FLOPs
                with FlopCounterMode(display=False) as counter:
                    runs[method].step([batch] * k)
                flops[method, k] = counter.get_total_flops()
            else:
                runs[method].step([batch] * k)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[method, k] = max(peaks.get((method, k), 0.0), torch.cuda.max_memory_allocated(device) / 1e9)
            times[method, k].append(time.perf_counter() - start)
            passes[method, k].append(runs[method].passes_s[-1])
    lines = [
        f"Training throughput, {args.shape} shape, micro-batch {args.batch} x (128 + 16) tokens, k micro-batches per "
        f"optimizer step, {args.adamw} AdamW, {layers.machine(device, args.precision, malloc)}, "
        f"median of {args.steps} steps:",
        "",
        "| method | k | step ms | tokens/s | time per token x dense (same k) | GFLOP per token | FLOPs x dense "
        "| peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    record: dict[str, dict] = {}
    for method, k in settings:
        timed, timed_passes = times[method, k][1 + args.warm_up :], passes[method, k][1 + args.warm_up :]
        step = statistics.median(timed)
        dense = statistics.median(times["dense", k][1 + args.warm_up :]) if "dense" in runs else None
        ratio = step / dense if dense else None
        peak = peaks.get((method, k))
        per_token = flops[method, k] / (k * tokens)
        flops_ratio = flops[method, k] / flops["dense", k] if "dense" in runs else None
        name = method if len(args.grad_accum) == 1 else f"{method} k={k}"
        record[name] = {
            "method": method, "k": k, "step_ms": step * 1e3, "steps_ms": [t * 1e3 for t in timed],
            "passes_ms": statistics.median(timed_passes) * 1e3, "steps_passes_ms": [t * 1e3 for t in timed_passes],
            "tokens_per_s": k * tokens / step, "x_dense": ratio,
            "peak_gb": peak,
            "flops_per_token": per_token, "flops_x_dense": flops_ratio,
        }  # fmt: skip
        shown = [f"{r:.2f}" if r else "-" for r in (ratio, flops_ratio)]
        shown_peak = f"{peak:.1f}" if peak is not None else "-"
        lines.append(
            f"| {method} | {k} | {step * 1e3:.0f} | {k * tokens / step:,.0f} | {shown[0]} | {per_token / 1e9:.2f} "
            f"| {shown[1]} | {shown_peak} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        meta = {"shape": args.shape, "precision": args.precision, "batch": args.batch, "steps": args.steps}
        meta["machine"] = layers.machine(device, args.precision, malloc)
        Path(args.json).write_text(json.dumps({**meta, "device": str(device), "methods": record}, indent=1))
    return text


if __name__ == "__main__":
    main()
