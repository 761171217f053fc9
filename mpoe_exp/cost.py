"""GPU-hour estimates of the paper's sweeps, from the cost model and each run's config.

The cost model is explained in docs/method.md, 'Cost model of GPU hours'.

    python -m mpoe_exp.cost [EXPERIMENT ...] [--tflops 60]

Every run of the experiment's sweep (conf/experiment/<name>.yaml, expanded as Hydra's basic sweeper does) is
composed and costed as training FLOPs over sustained FLOP/s; runs that an earlier experiment of the list already
has (same run directory) are not counted twice. Per training example:

  T5      6 (N_enc L_src + N_dec L_tgt + d V L_tgt) + 12 d (n_enc L_src^2 + n_dec (L_tgt^2 + L_tgt L_src))
  GPT-2   6 (N_body + d V) L + 12 d n_layer L^2

with N_enc / N_dec / N_body the non-embedding parameters a token passes through (one expert per layer for switch,
mpoe, mpoe++, which therefore cost what the dense model costs per token; two for top-2 moe), L the padded
sequence lengths of conf/paper/cost.yaml, d V the output projection. MPO methods add, per optimizer step, the
reconstruction of every expert matrix: 2 x 3 (forward and backward) x experts x mpo.contraction_macs per matrix
and layer, 2 x 4 where the matrices are contracted again for the backward instead of stored (method.recompute, the
MPO methods' default; and with train.grad_accum_steps > 1, where one contraction serves the step's micro-batches
and a second one its backward). Once per step however many micro-batches it has (under DistributedDataParallel
with train.grad_accum_steps > 1 it is once per micro-batch, which this does not count). Not included: evaluation,
sampling, routers, data loading. The throughput (--tflops) is an assumption: the default 60 is about 40% of an
A100's TF32 peak (the runs are fp32 with TF32 matmuls; precision=bf16 is faster).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import cache

from omegaconf import OmegaConf

from mpoe_exp import mpo
from mpoe_exp.backbones import ModelShapes, shapes_of
from mpoe_exp.config import CONFIG_DIR, compose_config, run_spec
from mpoe_exp.results import sweep_runs
from mpoe_exp.spec import RunSpec

PAPER_EXPERIMENTS = ("table1_t5_base", "table1_t5_large", "table1_gpt2", "table2", "table3", "table4")
COST_FILE = CONFIG_DIR / "paper" / "cost.yaml"
IGNORED_KEYS = ("seed", "train.lr")  # change nothing in the cost of a run


@dataclass
class Estimate:
    experiment: str
    runs: int = 0
    runs_shared: int = 0  # already counted by an earlier experiment
    train_tokens: float = 0.0
    flops: float = 0.0


@cache
def _body_parameters(model_name: str) -> dict[str, int]:
    """Non-embedding parameters of the dense backbone by part (encoder/decoder, or body), from the meta model."""
    from mpoe_exp.backbones import FAMILIES
    from mpoe_exp.models import load_backbone

    model_spec = run_spec(compose_config([f"model={model_name}", "method=dense"]), train=False).model
    model = load_backbone(model_spec, meta=True)
    embeddings = FAMILIES[model_spec.family].embedding_prefixes
    parts = {"encoder": 0, "decoder": 0, "body": 0}
    for name, p in model.named_parameters():
        if "embed" in name or name.startswith(embeddings):
            continue
        parts[name.split(".")[0] if name.startswith(("encoder.", "decoder.")) else "body"] += p.numel()
    return parts


def _shapes(spec: RunSpec) -> ModelShapes:
    return shapes_of(spec.model.family, spec.model.architecture)


def _ffn_parameters(spec: RunSpec) -> int:
    shapes = _shapes(spec)
    return (3 if shapes.gated else 2) * shapes.d_model * shapes.d_ff


def _reconstruction_flops(spec: RunSpec) -> float:
    """FLOPs of reconstructing every expert matrix of the model in one optimizer step (MPO methods), else 0: a
    forward and its backward (x 3), plus a second forward where the matrices are rebuilt for the backward instead of
    stored (x 4): `method.recompute` at one micro-batch per step, and always with several (MPOExperts.end_step)."""
    method = spec.method
    if method["experts"] != "mpo":
        return 0.0
    train = getattr(spec, "train", None)
    passes = 4 if method.get("recompute") or (train is not None and train.grad_accum_steps > 1) else 3
    shapes = _shapes(spec)
    d_model, d_ff, layers = shapes.d_model, shapes.d_ff, shapes.layers + shapes.decoder_layers
    settings = method["mpo"]
    macs = 0
    for rows, cols in ((d_ff, d_model), (d_model, d_ff)):
        row_shape, col_shape = mpo.factorization(
            rows, cols, settings["num_tensors"], settings.get("factorizations") or {}
        )
        macs += mpo.contraction_macs(row_shape, col_shape, settings.get("max_bond"))
    return 2 * passes * method["num_experts"] * layers * macs


def run_cost(spec: RunSpec, workload: dict) -> tuple[float, float]:
    """(training tokens, training FLOPs) of one run."""
    shapes, task, train = _shapes(spec), spec.task, spec.train
    pad = workload["padding"]
    tasks = workload["tasks"]
    top_k = spec.method["router"].get("top_k", 1) if spec.method["experts"] != "none" else 1
    ffn = _ffn_parameters(spec)
    parts = _body_parameters(spec.model.name)
    if shapes.decoder_layers:  # an encoder-decoder: source and target lengths
        names = list(task.tasks) if task.type == "glue_multitask" else [task.name]
        weights = _mixture_weights(names, getattr(task, "temperature", 1), tasks)
        l_src = sum(w * tasks[n]["source_tokens"] for n, w in weights.items()) * pad
        l_tgt = sum(w * tasks[n]["target_tokens"] for n, w in weights.items()) * pad
        examples = getattr(task, "mixture_size", None) or sum(tasks[n]["train"] for n in names)
        n_enc, n_dec, d = shapes.layers, shapes.decoder_layers, shapes.d_model
        per_example = 6 * (parts["encoder"] * l_src + parts["decoder"] * l_tgt + d * shapes.vocab_size * l_tgt)
        per_example += 6 * (top_k - 1) * ffn * (n_enc * l_src + n_dec * l_tgt)
        per_example += 12 * d * (n_enc * l_src**2 + n_dec * (l_tgt**2 + l_tgt * l_src))
        tokens_per_example = l_src + l_tgt
    else:
        d, layers = shapes.d_model, shapes.layers
        if task.name == "wikitext2":
            length = min(task.block_size, shapes.max_positions or task.block_size)
            examples = math.ceil(tasks["wikitext2"]["train_tokens"] / length)
        else:
            length, examples = tasks[task.name]["tokens"] * pad, tasks[task.name]["train"]
        per_example = 6 * (parts["body"] + d * shapes.vocab_size) * length + 6 * (top_k - 1) * ffn * layers * length
        per_example += 12 * d * layers * length**2
        tokens_per_example = length
    if train.max_steps:
        micro_batches = train.max_steps * train.grad_accum_steps
        examples_seen = micro_batches * train.batch_size
    else:
        micro_batches = math.ceil(examples / train.batch_size) * train.epochs
        examples_seen = examples * train.epochs
    optimizer_steps = math.ceil(micro_batches / train.grad_accum_steps)  # experts contracted once per step
    flops = examples_seen * per_example + optimizer_steps * _reconstruction_flops(spec)
    return examples_seen * tokens_per_example, flops


def _mixture_weights(names: list[str], temperature: float, tasks: dict) -> dict[str, float]:
    """Sampling probability of each task: size^(1/T), normalized (one task: 1)."""
    raw = {n: tasks[n]["train"] ** (1 / temperature) for n in names}
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def estimate(experiments: list[str], workload: dict | None = None) -> list[Estimate]:
    """The cost of each experiment's sweep; a run directory already counted in an earlier experiment is skipped."""
    workload = workload or OmegaConf.to_container(OmegaConf.load(COST_FILE), resolve=True)
    seen: set[str] = set()
    estimates = []
    for name in experiments:
        est = Estimate(name)
        for spec, directories in sweep_runs(name, IGNORED_KEYS):
            tokens, flops = run_cost(spec, workload)
            for directory in map(str, directories):
                est.runs += 1
                if directory in seen:
                    est.runs_shared += 1
                    continue
                seen.add(directory)
                est.train_tokens += tokens
                est.flops += flops
        estimates.append(est)
    return estimates


def render(estimates: list[Estimate], tflops: float) -> str:
    lines = [
        f"| experiment | runs | counted already | training tokens | PFLOP | GPU hours at {tflops:g} TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        hours = e.flops / (tflops * 1e12) / 3600
        lines.append(
            f"| {e.experiment} | {e.runs} | {e.runs_shared} | {e.train_tokens / 1e9:.2f}B | {e.flops / 1e15:,.0f} "
            f"| {hours:,.1f} |"
        )
    total = sum(e.flops for e in estimates) / (tflops * 1e12) / 3600
    lines.append(f"| all | {sum(e.runs for e in estimates)} | | | | {total:,.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpoe_exp.cost", description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=list(PAPER_EXPERIMENTS), help="experiment configs")
    parser.add_argument("--tflops", type=float, default=60.0, help="sustained TFLOP/s per GPU (default 60)")
    args = parser.parse_args(argv)
    from mpoe_exp.errors import run_command

    return run_command(lambda: print(render(estimate(args.experiments), args.tflops)))


if __name__ == "__main__":
    sys.exit(main())
