"""transformers v4's SwitchTransformersSparseMLP (our Switch reference) against the dense FFN, forward+backward.

It cannot be installed beside transformers 5, so it runs in its own environment:

    python3 -m venv .venv-v4 && .venv-v4/bin/pip install torch==2.13.0 "transformers<5"
    .venv-v4/bin/python benchmarks/reference_v4.py [--tokens 4096] [--repeats 7]

Same layer as benchmarks/layers.py (d = 768, d_ff = 3072, 8 experts upcycled from one random ReLU FFN, capacity
1.25 over all tokens, jitter 0.01, fp32 router), the two interleaved run by run; prints the median times and the
ratio. Imports nothing of this project. Why this reference: docs/method.md, 'Baselines: MoE and Switch'.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn


def main() -> None:
    from transformers import SwitchTransformersConfig, __version__
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    d_model, d_ff, experts, tokens = 768, 3072, 8, args.tokens
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.ReLU(), nn.Linear(d_ff, d_model, bias=False))
    config = SwitchTransformersConfig(
        d_model=d_model, d_ff=d_ff, num_experts=experts, expert_capacity=math.ceil(1.25 * tokens / experts),
        dropout_rate=0.0, router_jitter_noise=0.01, router_dtype="float32", router_bias=True,
    )  # fmt: skip
    reference = SwitchTransformersSparseMLP(config)
    with torch.no_grad():
        for e in range(experts):
            expert = reference.experts[f"expert_{e}"]
            expert.wi.weight.copy_(dense[0].weight)
            expert.wo.weight.copy_(dense[2].weight)
    x = torch.randn(1, tokens, d_model, requires_grad=True)

    def forward_backward(layer: nn.Module) -> float:
        start = time.perf_counter()
        out = layer(x.clone())  # clone: the reference jitters its input in place
        (out[0] if isinstance(out, tuple) else out).sum().backward()  # v4 returns (states, router outputs)
        for p in layer.parameters():
            p.grad = None
        return time.perf_counter() - start

    layers = {"dense": dense, f"SwitchTransformersSparseMLP (transformers {__version__})": reference}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(args.repeats + 1):
        for name, layer in layers.items():
            times[name].append(forward_backward(layer))
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    dense_time = medians["dense"]
    print(f"| tokens | layer | fwd+bwd ms | x dense |  ({torch.get_num_threads()} threads, torch {torch.__version__})")
    for name, t in medians.items():
        print(f"| {tokens} | {name} | {t * 1e3:.1f} | {t / dense_time:.2f} |")


if __name__ == "__main__":
    main()
