"""End to end: training tokens per second of a T5 (t5-small's or t5-base's shape, random weights) per method.

    python benchmarks/train_throughput.py [--methods dense switch mpoe] [--steps 5] [--batch 8] [--device cpu|cuda]
                                          [--shape t5-small|t5-base] [--precision fp32|bf16] [--json out.json]

Each step is what the trainer does: forward with labels, the auxiliary losses, backward, gradient clipping, and the
optimizer step through the gradient mask (AdamW). Tokens are the source and target tokens of a step (random ids,
source length 128, target length 16). The methods alternate step by step after a warm-up step each, so drift on a
shared machine hits all alike; the table gives the median step time, tokens/s and the ratio to dense, and on CUDA
the peak memory allocated by each method's steps. `--precision bf16` runs the forward under bf16 autocast, as
train.precision=bf16 does. Models are built offline from the byte vocabulary of tiny-t5 (no download).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from mpoe_exp import compose_config
from mpoe_exp.gradient_mask import CentralGradientMask
from mpoe_exp.models import build_model
from mpoe_exp.moe import central_parameters, collect_aux_loss


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
    """One method's model, optimizer and gradient mask."""

    def __init__(self, method: str, device: torch.device, shape: str = "t5-small", precision: str = "fp32"):
        cfg = compose_config([*SHAPES[shape], f"method={method}"])
        torch.manual_seed(0)
        self.model, _ = build_model(cfg)
        self.model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        prob = cfg.method.get("gradient_mask_prob", 0.0) if cfg.method.experts == "mpo" else 0.0
        self.mask = CentralGradientMask(central_parameters(self.model), prob, seed=0)
        self.vocab = cfg.model.architecture.vocab_size
        self.device, self.precision = device, precision

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        bf16 = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else None
        with bf16 or contextlib.nullcontext():
            loss = self.model(**batch).loss
            aux = collect_aux_loss(self.model)
            if aux is not None:
                loss = loss + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.mask.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)


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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", help="write the measurements to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runs = {m: Run(m, device, args.shape, args.precision) for m in args.methods}
    batch = make_batch(args.batch, next(iter(runs.values())).vocab, device)
    tokens = batch["input_ids"].numel() + batch["labels"].numel()
    times: dict[str, list[float]] = {m: [] for m in runs}
    peaks: dict[str, float] = {}
    for _ in range(args.steps + 1):
        for method, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            run.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[method] = max(peaks.get(method, 0.0), torch.cuda.max_memory_allocated(device) / 1e9)
            times[method].append(time.perf_counter() - start)
    dense = statistics.median(times["dense"][1:]) if "dense" in times else None
    lines = [
        f"Training throughput, {args.shape} shape, batch {args.batch} x (128 + 16) tokens, {device}, "
        f"{args.precision}, median of {args.steps} steps:",
        "",
        "| method | step ms | tokens/s | x dense time | peak GB |",
        "|---|---:|---:|---:|---:|",
    ]
    record: dict[str, dict] = {}
    for method, values in times.items():
        step = statistics.median(values[1:])
        ratio = step / dense if dense else None
        peak = peaks.get(method)
        record[method] = {"step_ms": step * 1e3, "tokens_per_s": tokens / step, "x_dense": ratio, "peak_gb": peak}
        shown_ratio = f"{ratio:.2f}" if ratio else "-"
        shown_peak = f"{peak:.1f}" if peak is not None else "-"
        lines.append(f"| {method} | {step * 1e3:.0f} | {tokens / step:,.0f} | {shown_ratio} | {shown_peak} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        meta = {"shape": args.shape, "precision": args.precision, "batch": args.batch, "steps": args.steps}
        Path(args.json).write_text(json.dumps({**meta, "device": str(device), "methods": record}, indent=1))
    return text


if __name__ == "__main__":
    main()
