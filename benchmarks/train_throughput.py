"""End to end: training tokens per second of a small T5 (t5-small's shape, random weights) per method, in one run.

    python benchmarks/train_throughput.py [--methods dense switch mpoe] [--steps 5] [--batch 8] [--device cpu|cuda]

Each step is what the trainer does: forward with labels, the auxiliary losses, backward, gradient clipping, and the
optimizer step through the gradient mask (AdamW). Tokens are the source and target tokens of a step (random ids,
source length 128, target length 16). The methods alternate step by step after a warm-up step each, so drift on a
shared machine hits all alike; the table gives the median step time, tokens/s and the ratio to dense.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpoe_exp import compose_config
from mpoe_exp.gradient_mask import CentralGradientMask
from mpoe_exp.models import build_model
from mpoe_exp.moe import central_parameters, collect_aux_loss

# t5-small's shape (d_model 512, d_ff 2048, 8 heads, 6 + 6 layers, ReLU FFN) with the offline byte vocabulary
SMALL = [
    "model=tiny-t5", "model.architecture.d_model=512", "model.architecture.d_ff=2048", "model.architecture.d_kv=64",
    "model.architecture.num_heads=8", "model.architecture.num_layers=6", "model.architecture.num_decoder_layers=6",
]  # fmt: skip


class Run:
    """One method's model, optimizer and gradient mask."""

    def __init__(self, method: str, device: torch.device):
        cfg = compose_config([*SMALL, f"method={method}"])
        torch.manual_seed(0)
        self.model, _ = build_model(cfg)
        self.model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        prob = cfg.method.get("gradient_mask_prob", 0.0) if cfg.method.experts == "mpo" else 0.0
        self.mask = CentralGradientMask(central_parameters(self.model), prob, seed=0)
        self.vocab = cfg.model.architecture.vocab_size

    def step(self, batch: dict[str, torch.Tensor]) -> None:
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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runs = {m: Run(m, device) for m in args.methods}
    batch = make_batch(args.batch, next(iter(runs.values())).vocab, device)
    tokens = batch["input_ids"].numel() + batch["labels"].numel()
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(args.steps + 1):
        for method, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[method].append(time.perf_counter() - start)
    dense = statistics.median(times["dense"][1:]) if "dense" in times else None
    lines = [
        f"Training throughput, t5-small shape, batch {args.batch} x (128 + 16) tokens, {device}, "
        f"median of {args.steps} steps:",
        "",
        "| method | step ms | tokens/s | x dense time |",
        "|---|---:|---:|---:|",
    ]
    for method, values in times.items():
        step = statistics.median(values[1:])
        ratio = f"{step / dense:.2f}" if dense else "-"
        lines.append(f"| {method} | {step * 1e3:.0f} | {tokens / step:,.0f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
