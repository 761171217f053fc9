"""The training loop: AdamW + warmup/linear decay, clipping, label smoothing, accumulation, aux losses, the
gradient mask, mixed precision on CUDA, evaluation on validation every N steps, best/last checkpoints, resume.

Multi-GPU: launched with torchrun (WORLD_SIZE > 1), `setup_distributed` joins the process group and the model is
wrapped in DistributedDataParallel; `train.batch_size` stays the global batch, each rank taking every
world_size-th example of it. Every rank evaluates (the same numbers); rank 0 alone writes logs and checkpoints.

Resuming is exact: the data order of each epoch comes from (seed, epoch), and a checkpoint holds the model,
optimizer, scheduler, gradient-mask generator and every RNG state at an optimizer-step boundary, so a run killed at
any point and restarted with the same command continues as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mpoe_exp.errors import UserError
from mpoe_exp.gradient_mask import CentralGradientMask
from mpoe_exp.moe import central_parameters, collect_aux_loss

LAST, BEST = "last.pt", "best.pt"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_distributed() -> Distributed:
    """Join the torchrun process group (NCCL on GPUs, Gloo on CPUs); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Distributed(torch.distributed.get_rank(), world_size, local_rank)


def resolve_device(name: str, dist: Distributed | None = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but CUDA is not available on this machine; use device=cpu")
    return device


def autocast(device: torch.device, precision: str):
    """Mixed precision context on any device (CPU autocast included): bf16 or fp16 autocast, fp32 does nothing.
    fp16 steps go through a GradScaler (the Trainer's, on every device)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UserError(
            f"train.precision={precision!r} is not a precision we train in; allowed: fp32, bf16, fp16 "
            f"(e.g. train.precision=bf16)"
        )
    if dtypes[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over labels != -100. logits (B, T, V), labels (B, T)."""
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Trainer:
    """Trains `model` on `task` as `train_cfg` says, writing checkpoints under `run_dir/checkpoints`."""

    def __init__(
        self,
        model,
        task,
        train_cfg: DictConfig,
        method_cfg: DictConfig,
        run_dir: Path,
        seed: int,
        device,
        logger=None,
        dist: Distributed | None = None,
    ):
        self.model, self.task, self.cfg, self.seed, self.device = model, task, train_cfg, seed, device
        self.logger = logger
        self.dist = dist or Distributed()
        self.train_model = model
        if self.dist.world_size > 1:
            # experts that receive no token in a step have no gradient: find_unused_parameters
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=True
            )
        self.checkpoints = Path(run_dir) / "checkpoints"
        self.log_path = Path(run_dir) / "train.log"
        self.features = task.train_features()
        if not self.features:
            raise UserError(f"task {task.name}: the training split is empty")
        bs, accum = train_cfg.batch_size, train_cfg.grad_accum_steps
        self.micro_batches_per_epoch = math.ceil(len(self.features) / bs)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / accum)
        self.total_steps = train_cfg.max_steps or train_cfg.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=train_cfg.lr,
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
        )
        warmup = train_cfg.warmup_steps
        if warmup is None:
            warmup = int(train_cfg.warmup_ratio * self.total_steps)

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        prob = method_cfg.get("gradient_mask_prob", 0.0) if method_cfg.get("experts") == "mpo" else 0.0
        self.mask = CentralGradientMask(central_parameters(model), prob, seed=seed)
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=train_cfg.precision == "fp16")
        self.state = TrainState()

    # --- checkpoints ---

    def save_checkpoint(self) -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        atomic_torch_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "mask": self.mask.state_dict(),
                "rng": rng,
                "state": asdict(self.state),
            },
            self.checkpoints / LAST,
        )

    def try_resume(self) -> bool:
        path = self.checkpoints / LAST
        if not path.is_file():
            return False
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a corrupt checkpoint: say so rather than silently restarting
            raise UserError(f"cannot resume: {path} is unreadable ({err}); delete it or run with force=true") from None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.mask.load_state_dict(ckpt["mask"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        self.state = TrainState(**ckpt["state"])
        return True

    def load_best(self) -> None:
        path = self.checkpoints / BEST
        if path.is_file():
            self.model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    # --- the loop ---

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.features), generator=generator).tolist()

    def micro_batches(self):
        """(epoch, index, batch) from the resume position on, forever (the loop stops at total_steps)."""
        bs = self.cfg.batch_size
        epoch, start = self.state.epoch, self.state.micro_batch
        while True:
            order = self.epoch_order(epoch)
            for i in range(start, self.micro_batches_per_epoch):
                ids = order[i * bs : (i + 1) * bs]
                if self.dist.world_size > 1:  # this rank's share of the global micro-batch
                    ids = ids[self.dist.rank :: self.dist.world_size] or ids[:1]
                yield epoch, i, self.task.collate([self.features[j] for j in ids])
            epoch, start = epoch + 1, 0

    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.cfg.precision):
            metrics = self.task.evaluate(self.model, split, self.cfg.eval_batch_size, self.device)
        self.model.train()
        return metrics

    def fit(self) -> TrainState:
        resumed = self.try_resume()
        self.model.train()
        state, cfg = self.state, self.cfg
        accum = cfg.grad_accum_steps
        progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=f"train {self.task.name}",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        if resumed:
            progress.write(f"resumed from {self.checkpoints / LAST} at step {state.step}")
        batches = self.micro_batches()
        start_time, running_loss, losses = time.perf_counter(), 0.0, 0
        while state.step < self.total_steps:
            in_step = 0
            for epoch, index, batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with autocast(self.device, cfg.precision):
                    loss = self.task.loss(self.train_model, batch, cfg.label_smoothing)
                    aux = collect_aux_loss(self.model)
                    if aux is not None:
                        loss = loss + aux
                if not torch.isfinite(loss):
                    progress.close()
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {state.step + 1} (epoch {epoch}, batch {index}); "
                        f"the last good checkpoint is kept at {self.checkpoints / LAST}. "
                        f"Try a lower train.lr, precision=fp32 or a smaller train.grad_clip."
                    )
                self.scaler.scale(loss / accum).backward()
                running_loss += loss.item()
                losses += 1
                state.tokens += int(batch["attention_mask"].sum())
                in_step += 1
                state.epoch, state.micro_batch = epoch, index + 1
                if state.micro_batch == self.micro_batches_per_epoch:
                    state.epoch, state.micro_batch = epoch + 1, 0
                if in_step == accum or state.micro_batch == 0:
                    break
            self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.mask.step(_ScaledOptimizer(self.optimizer, self.scaler))
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                progress.set_postfix(loss=f"{running_loss / max(1, losses):.4f}")
            if state.step % cfg.eval_every == 0 or state.step == self.total_steps:
                state.train_seconds += time.perf_counter() - start_time
                self.evaluate_and_checkpoint(running_loss / max(1, losses))
                start_time, running_loss, losses = time.perf_counter(), 0.0, 0
        progress.close()
        return state

    def evaluate_and_checkpoint(self, train_loss: float) -> None:
        state = self.state
        if self.dist.world_size > 1:  # the loss of the global batch, not of this rank's share
            loss = torch.tensor([train_loss], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(loss)
            train_loss = loss.item() / self.dist.world_size
        metrics = self.evaluate("validation")
        value = metrics[self.task.main_metric]
        better = state.best_metric is None or (
            value > state.best_metric if self.task.greater_is_better else value < state.best_metric
        )
        record = {
            "step": state.step,
            "loss": train_loss,
            "validation": metrics,
            "central_updates": self.mask.central_updates,
        }
        state.history.append(record)
        self.log(record)
        if self.logger is not None and self.dist.is_main:
            self.logger.log(record)
        if better:
            state.best_metric, state.best_step = value, state.step
            if self.dist.is_main:
                atomic_torch_save(self.model.state_dict(), self.checkpoints / BEST)
        if self.dist.is_main:
            self.save_checkpoint()
        self.dist.barrier()


class _ScaledOptimizer:
    """Lets the gradient mask call `step()` through the fp16 GradScaler (a no-op wrapper without fp16)."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self, closure=None):
        return self.scaler.step(self.optimizer)
