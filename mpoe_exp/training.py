"""The training loop: AdamW (fused) + warmup/linear decay, clipping, label smoothing, accumulation, aux losses, the
gradient mask, mixed precision (bf16/fp16 autocast, on CUDA and CPU), evaluation on validation, best/last
checkpoints, resume.

One optimizer step is `TrainingStep`: draw the gradient mask (paper section 3.2, eq. 4), run the step's
micro-batches forward and backward (without central gradients on a masked step), unscale, clip the gradients that
will be applied, step the optimizer and the scheduler. `Trainer` feeds it micro-batches and decides when to
evaluate and when to checkpoint (`StepPlan`):

- validation every `eval_interval` steps and at the last step: `train.eval_every`, or when it is null
  steps_per_epoch / `train.evals_per_epoch`, but at most total_steps / `train.min_evals`, so that every run is
  evaluated at least `min_evals` times and the best checkpoint (best.pt) has something to choose from;
- a resume checkpoint (last.pt) every `train.checkpoint_every` steps and at the last step, independent of evaluation.

Multi-GPU: launched with torchrun (WORLD_SIZE > 1), `setup_distributed` joins the process group and the model is
wrapped in DistributedDataParallel; `train.batch_size` stays the global batch, each rank taking every
world_size-th example of it. Every rank evaluates (the same numbers); rank 0 alone writes logs and checkpoints.

Data order: each epoch is a permutation drawn from (seed, epoch), cut into micro-batches. With
`train.group_by_length` the permutation is regrouped so that each micro-batch holds examples of similar length
(`length_grouped_order`): far less padding, about half the compute on GLUE, batches still in random order.

Resuming is exact: the data order of each epoch comes from (seed, epoch), and a checkpoint holds the model,
optimizer, scheduler, gradient-mask generator, every RNG state and the running training loss at an optimizer-step
boundary, so a run killed at any point and restarted with the same command continues as if it had never stopped.
Checkpoints hold tensors and plain Python values only and are read with `torch.load(weights_only=True)`: loading
one cannot run code.

Throughput: `TrainState.tokens` counts the tokens the model processes in training, summed over all ranks:
the non-padding input tokens (attention_mask), plus for an encoder-decoder model (T5) the target tokens the
decoder reads (labels != -100); a causal LM's labels are its inputs and are not counted twice. `train_seconds`
is the time spent in training steps (evaluation and checkpoints excluded), `elapsed_seconds` the wall time of
training, evaluation and checkpoints; both add up across resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from mpoe_exp.errors import UserError
from mpoe_exp.gradient_mask import CentralGradientMask
from mpoe_exp.results import atomic_replace, atomic_write_text
from mpoe_exp.spec import EVALS_PER_EPOCH, MIN_EVALS, TrainSpec
from mpoe_exp.tasks.protocol import Task

LAST, BEST = "last.pt", "best.pt"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteLoss(ArithmeticError):
    """A micro-batch's loss is NaN or infinite (raised before its backward pass)."""

    def __init__(self, micro_batch: int, value: float):
        super().__init__(f"the loss of micro-batch {micro_batch} is {value}")
        self.micro_batch, self.value = micro_batch, value


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    tokens: int = 0  # tokens processed in training, all ranks (see the module docstring)
    train_seconds: float = 0.0  # time in training steps
    elapsed_seconds: float = 0.0  # wall time of fit() up to the last checkpoint, across resumes
    running_loss: float = 0.0  # sum of micro-batch losses since the last evaluation
    running_batches: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state (torch, CUDA, Python, NumPy) as tensors and plain values (loadable with weights_only)."""
    version, python_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
    TrainSpec.check_field("precision", precision)  # the one rule of train.precision (mpoe_exp/spec.py)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtypes[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])


def processed_tokens(batch: dict[str, torch.Tensor], encoder_decoder: bool) -> int:
    """Non-padding tokens the model reads: inputs by attention_mask, plus the decoder's targets (encoder-decoder)."""
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if encoder_decoder and "labels" in batch:
        tokens += int((batch["labels"] != -100).sum())
    return tokens


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through `results.atomic_replace`: a crash never leaves a half-written `path`, a full disk is one
    message and the previous checkpoint stays."""
    with atomic_replace(path) as tmp:
        torch.save(obj, tmp)


def remove_temporary_files(*directories: Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` files that `results.atomic_replace` writes killed mid-write left (checkpoints,
    results.json, train.log) in `directories` (not below them); returns them."""
    stale = [p for directory in directories for p in Path(directory).glob(".?*.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def truncate_log(path: Path, step: int) -> int:
    """Cut a JSON-lines log back to its records of steps <= `step` (and drop a line a kill cut short), rewriting it
    atomically when anything goes; returns the number of lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def unparsable_count(metrics: dict[str, Any]) -> float | None:
    """Predictions that could not be parsed: "unparsable", or the sum of "<task>/unparsable" (multi-task GLUE);
    None when the metrics count none (classifiers, language models)."""
    if "unparsable" in metrics:
        return metrics["unparsable"]
    counts = [v for k, v in metrics.items() if k.endswith("/unparsable")]
    return sum(counts) if counts else None


def replaces_best(
    metrics: dict[str, Any], best: dict[str, Any] | None, main_metric: str, greater_is_better: bool
) -> bool:
    """Whether validation `metrics` make a better checkpoint than the `best` so far (see `Trainer`): a better main
    metric; on a tie fewer unparsable predictions; on a tie of both the later checkpoint. NaN never wins."""
    if best is None:
        return True
    value, incumbent = metrics[main_metric], best[main_metric]
    if math.isnan(value) or math.isnan(incumbent):
        return not math.isnan(value)
    if value != incumbent:
        return value > incumbent if greater_is_better else value < incumbent
    return (unparsable_count(metrics) or 0) <= (unparsable_count(best) or 0)


# --- the plan: steps, evaluations, checkpoints ------------------------------------------------------------------


def evaluation_interval(
    total_steps: int,
    steps_per_epoch: int,
    eval_every: int | None = None,
    evals_per_epoch: int = EVALS_PER_EPOCH,
    min_evals: int = MIN_EVALS,
) -> int:
    """Optimizer steps between validation evaluations: `eval_every` when given, else steps_per_epoch /
    evals_per_epoch, but at most total_steps / min_evals (so a run has >= min_evals evaluations when it can)."""
    if eval_every:
        return eval_every
    per_epoch = max(1, steps_per_epoch // evals_per_epoch)
    return min(per_epoch, max(1, total_steps // min_evals))


def length_grouped_order(
    order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, group_batches: int = 50
) -> list[int]:
    """`order` (a shuffled epoch) regrouped so that each consecutive `batch_size` slice holds similar lengths.

    The order is cut into groups of up to `group_batches` batches (fewer for a small epoch, so that it has at least
    4 groups), each group is sorted by length and cut into batches, and the full batches are shuffled with
    `generator`; the one short batch an epoch may have stays last, so batch boundaries stay where slicing the
    order by `batch_size` puts them. (The idea of transformers' `group_by_length`; its batches are not shuffled.)
    """
    group = batch_size * max(1, min(group_batches, len(order) // (4 * batch_size)))
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in shuffled + short for i in batch]


@dataclass(frozen=True)
class StepPlan:
    """How long a run trains and when it evaluates and checkpoints (optimizer steps)."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    eval_interval: int
    checkpoint_interval: int

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_interval == 0 or step == self.total_steps

    def checkpoints_at(self, step: int) -> bool:
        return step % self.checkpoint_interval == 0 or step == self.total_steps

    def evaluation_steps(self) -> list[int]:
        return [s for s in range(1, self.total_steps + 1) if self.evaluates_at(s)]


def plan_steps(num_examples: int, train_cfg: TrainSpec) -> StepPlan:
    """The plan of a run over `num_examples` training examples with the `train.*` settings."""
    if train_cfg.batch_size > num_examples:  # the global batch: each of several processes takes a share of it
        raise UserError(
            f"train.batch_size={train_cfg.batch_size} is more than the {num_examples} training examples: a batch "
            f"holds at most the whole training split; set train.batch_size <= {num_examples}"
        )
    micro_batches = math.ceil(num_examples / train_cfg.batch_size)
    steps_per_epoch = math.ceil(micro_batches / train_cfg.grad_accum_steps)
    total = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch
    interval = evaluation_interval(
        total, steps_per_epoch, train_cfg.eval_every, train_cfg.evals_per_epoch, train_cfg.min_evals
    )
    return StepPlan(micro_batches, steps_per_epoch, total, interval, train_cfg.checkpoint_every)


# --- one optimizer step ---------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    losses: list[float]  # per micro-batch, aux losses included
    tokens: int  # tokens processed on this rank
    masked: bool  # the central tensors were left out (gradient mask)
    applied: bool  # False: the fp16 GradScaler skipped the update (inf/nan gradients)


LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, lr: float, eps: float = 1e-8, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """torch's AdamW, fused where the parameters' device has the fused kernel (CPU, CUDA): one pass over each
    parameter. torch's default (foreach) chains list operations instead, with temporaries the size of the
    parameters: several times slower on a 2-core CPU (`benchmarks/adamw.py`; BENCHMARKS.md, 'Optimizer step').
    Same update up to rounding (tested). Parameters without a gradient in a step (the centrals on a masked step)
    are left alone, as by any AdamW.

    The fused kernel writes the parameters without moving their version counters (torch 2.13), so anything keyed
    by `_version` (MPOE's evaluation cache of contracted matrices, `MPOExperts.materialize`) would not see the step:
    a step hook moves them."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if fused:
        optimizer.register_step_post_hook(_count_the_update)
    return optimizer


def _count_the_update(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Move the version counters of the parameters a fused step wrote (those with a gradient)."""
    torch.autograd.graph.increment_version(
        [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    )


@dataclass
class TrainingStep:
    """One optimizer step over a list of micro-batches: mask draw, forward/backward, unscale, clip, optimizer and
    scheduler step. On a masked step the centrals compute no gradient, so clipping sees only the applied ones."""

    model: torch.nn.Module  # the unwrapped model: its aux losses and parameters
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    mask: CentralGradientMask
    grad_clip: float | None = None
    precision: str = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    encoder_decoder: bool = False

    def __call__(
        self, forward_model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFunction
    ) -> StepOutcome:
        masked = self.mask.draw()  # before any forward pass of the step (eq. 4)
        with self.mask.frozen(masked):
            losses, tokens = self.accumulate(forward_model, micro_batches, loss_fn)
            self.scaler.unscale_(self.optimizer)
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            applied = self.optimizer_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.mask.record(masked, applied)
        return StepOutcome(losses, tokens, masked, applied)

    def accumulate(
        self, forward_model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFunction
    ) -> tuple[list[float], int]:
        """Backward of the mean loss over the micro-batches; (their losses, the tokens they hold)."""
        with one_contraction_per_step(self.model, self.device, self.precision, forward_model, len(micro_batches)):
            return self._accumulate(forward_model, micro_batches, loss_fn)

    def _accumulate(
        self, forward_model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFunction
    ) -> tuple[list[float], int]:
        losses, tokens = [], 0
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast(self.device, self.precision):
                loss = loss_fn(forward_model, batch)
                aux = training_hooks(self.model).aux_loss()
                if aux is not None:
                    loss = loss + aux
            if not torch.isfinite(loss):
                raise NonFiniteLoss(i, loss.item())
            self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.item())
            tokens += processed_tokens(batch, self.encoder_decoder)
        return losses, tokens

    def optimizer_step(self) -> bool:
        """The optimizer step through the GradScaler; False when the scaler skipped it (the scale went down)."""
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale


class TrainingHooks(Protocol):
    """What the trainer needs of a model with expert layers; the model owns it (`model.training_hooks`, set when the
    model is upcycled: moe/hooks.py). A model without it trains as a dense one (`NO_EXPERTS`)."""

    gradient_mask_prob: float  # p_b: how often a step leaves the central parameters out

    def aux_loss(self) -> torch.Tensor | None: ...  # added to the task loss of each forward
    def central_parameters(self) -> list[torch.nn.Parameter]: ...  # what the gradient mask acts on
    def begin_step(self) -> None: ...  # an optimizer step of several micro-batches starts (under autocast)
    def end_step(self, backward: bool = True) -> None: ...  # it ends; backward=False: it failed before backward
    def reset_routing_stats(self) -> None: ...  # start recording where tokens are routed (training, an evaluation)
    def routing_stats(self) -> dict[str, dict[str, Any]]: ...  # end it: per routed layer, its telemetry


class _NoExperts:
    gradient_mask_prob = 0.0

    def aux_loss(self) -> None:
        return None

    def central_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def begin_step(self) -> None:
        pass

    def end_step(self, backward: bool = True) -> None:
        pass

    def reset_routing_stats(self) -> None:
        pass

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        return {}


NO_EXPERTS: TrainingHooks = _NoExperts()


def training_hooks(model: torch.nn.Module) -> TrainingHooks:
    return getattr(model, "training_hooks", None) or NO_EXPERTS


@contextlib.contextmanager
def one_contraction_per_step(
    model: torch.nn.Module, device: torch.device, precision: str, forward_model: torch.nn.Module, micro_batches: int
) -> Iterator[None]:
    """With gradient accumulation, the model's expert matrices are computed once per optimizer step, not once per
    micro-batch (`TrainingHooks.begin_step`: MPO experts contract each matrix once and send its gradient back through
    the contraction once). Not under DistributedDataParallel, whose reducer expects every parameter's gradient from
    each micro-batch's backward."""
    distributed = isinstance(forward_model, torch.nn.parallel.DistributedDataParallel)
    if micro_batches == 1 or distributed:
        yield
        return
    hooks = training_hooks(model)
    with autocast(device, precision):  # contracted as the forward would (in the autocast dtype)
        hooks.begin_step()
    try:
        yield
    except BaseException:
        hooks.end_step(backward=False)
        raise
    hooks.end_step()


# --- the trainer ------------------------------------------------------------------------------------------------


class Trainer:
    """Trains `model` on `task` as `train_cfg` says, writing checkpoints under `run_dir/checkpoints`.

    Checkpoint selection (best.pt, `replaces_best`): an evaluation replaces the best so far when its main validation
    metric is strictly better; on an equal metric, when it has fewer unparsable predictions (T5 on GLUE counts them:
    MCC 0 with 60 of 60 predictions unparsable does not tie with MCC 0 and 0 of 60); on equal counts too, the later
    checkpoint wins. Validation then gives no reason to prefer the earlier one, and the later one has trained longer
    to the same score; ties are common on GLUE's small validation sets, and the earliest of them is usually the
    least trained model. A NaN metric never replaces a number.

    On resume (and on a fresh start) train.log and the logger continue after the checkpoint's step: the evaluations
    a killed process logged past its last checkpoint are dropped and made again (`continue_history`), so a resumed
    run's history equals an uninterrupted one's.
    """

    def __init__(
        self,
        model,
        task: Task,
        train_cfg: TrainSpec,
        run_dir: Path,
        seed: int,
        device,
        logger=None,
        dist: Distributed | None = None,
        config_hash: str | None = None,
    ):
        self.model, self.task, self.cfg, self.seed, self.device = model, task, train_cfg, seed, device
        self.config_hash = config_hash  # stored in every checkpoint; a resume refuses another config's checkpoint
        self.progress = None  # the progress bar while fit() runs (evaluations print above it)
        self.logger = logger
        self.dist = dist or Distributed()
        self.train_model = model
        if self.dist.world_size > 1:
            # experts that receive no token in a step, and the centrals on a masked step, have no gradient
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=True
            )
        self.checkpoints = Path(run_dir) / "checkpoints"
        self.log_path = Path(run_dir) / "train.log"
        self.features = task.train_features()
        if not self.features:
            raise UserError(f"task {task.name}: the training split is empty")
        self.plan = plan_steps(len(self.features), train_cfg)
        self.total_steps = self.plan.total_steps
        self.optimizer = adamw(
            [p for p in model.parameters() if p.requires_grad],
            lr=train_cfg.lr,
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.lr_factor(step))
        self.hooks = training_hooks(model)
        self.mask = CentralGradientMask(self.hooks.central_parameters(), self.hooks.gradient_mask_prob, seed=seed)
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=train_cfg.precision == "fp16")
        self.training_step = TrainingStep(
            model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.mask,
            grad_clip=train_cfg.grad_clip,
            precision=train_cfg.precision,
            device=device,
            encoder_decoder=bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)),
        )
        self.state = TrainState()
        self._clock = (0.0, time.perf_counter())  # (elapsed seconds before this process, when fit started)

    def lr_factor(self, step: int) -> float:
        """Linear warmup over `warmup_steps` (or warmup_ratio x total steps), then linear decay to 0."""
        total = self.plan.total_steps
        warmup = self.cfg.warmup_steps
        if warmup is None:
            warmup = int(self.cfg.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    # --- checkpoints ---

    def save_checkpoint(self) -> None:
        self.state.elapsed_seconds = self.wall_seconds()
        atomic_torch_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "mask": self.mask.state_dict(),
                "rng": rng_state(),
                "state": asdict(self.state),
                "config_hash": self.config_hash,
            },
            self.checkpoints / LAST,
        )

    def try_resume(self) -> bool:
        """Load last.pt if there is one (True); first delete the temporary files killed writes left."""
        if self.dist.is_main:
            remove_temporary_files(self.log_path.parent, self.checkpoints)
        path = self.checkpoints / LAST
        if not path.is_file():
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt checkpoint: say so rather than silently restarting
            raise UserError(f"cannot resume: {path} is unreadable ({err}); delete it or run with force=true") from None
        if ckpt.get("config_hash") != self.config_hash:
            raise UserError(
                f"cannot resume: {path} was saved by another config (config_hash {ckpt.get('config_hash')}, this "
                f"run's is {self.config_hash}); run with force=true to start this run afresh"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.mask.load_state_dict(ckpt["mask"])
        set_rng_state(ckpt["rng"])
        self.state = TrainState(**ckpt["state"])
        return True

    def load_best(self) -> None:
        path = self.checkpoints / BEST
        if path.is_file():
            self.model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def wall_seconds(self) -> float:
        """Wall time of training so far: this process's fit() plus what earlier processes checkpointed."""
        before, start = self._clock
        return before + time.perf_counter() - start

    # --- the loop ---

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.features), generator=generator).tolist()
        if not self.cfg.group_by_length:
            return order
        lengths = [len(f["input_ids"]) for f in self.features]
        return length_grouped_order(order, lengths, self.cfg.batch_size, generator)

    def micro_batches(self) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index, batch) from the resume position on, forever (the loop stops at total_steps)."""
        bs = self.cfg.batch_size
        epoch, start = self.state.epoch, self.state.micro_batch
        while True:
            order = self.epoch_order(epoch)
            for i in range(start, self.plan.micro_batches_per_epoch):
                ids = order[i * bs : (i + 1) * bs]
                if self.dist.world_size > 1:  # this rank's share of the global micro-batch
                    ids = ids[self.dist.rank :: self.dist.world_size] or ids[:1]
                yield epoch, i, self.task.collate([self.features[j] for j in ids])
            epoch, start = epoch + 1, 0

    def next_micro_batches(self, batches: Iterator[tuple[int, int, dict]]) -> list[tuple[int, int, dict]]:
        """The micro-batches of the next optimizer step (grad_accum_steps, fewer at an epoch's end)."""
        state, taken = self.state, []
        for epoch, index, batch in batches:
            taken.append((epoch, index, batch))
            state.epoch, state.micro_batch = epoch, index + 1
            if state.micro_batch == self.plan.micro_batches_per_epoch:
                state.epoch, state.micro_batch = epoch + 1, 0
            if len(taken) == self.cfg.grad_accum_steps or state.micro_batch == 0:
                break
        return taken

    def continue_history(self) -> None:
        """train.log and the logger continue after the resumed step (0 on a fresh start): what a killed process
        logged past its last checkpoint goes, as the resumed run evaluates those steps again."""
        if not self.dist.is_main:
            return
        truncate_log(self.log_path, self.state.step)
        if self.logger is not None:
            self.logger.resume(self.state.step)

    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
        self.continue_history()
        self._clock = (self.state.elapsed_seconds, time.perf_counter())
        self.model.train()
        state, plan = self.state, self.plan
        progress = tqdm(
            total=plan.total_steps,
            initial=state.step,
            desc=f"train {self.task.name}",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        if resumed:
            progress.write(f"resumed from {self.checkpoints / LAST} at step {state.step}")
        self.progress = progress
        batches = self.micro_batches()
        self.hooks.reset_routing_stats()  # the training routing, read at each evaluation (train_routing)
        with contextlib.closing(progress):
            while state.step < plan.total_steps:
                self.train_one_step(batches)
                progress.update(1)
                if state.step % self.cfg.log_every == 0 or state.step == plan.total_steps:
                    progress.set_postfix(loss=f"{state.running_loss / max(1, state.running_batches):.4f}")
                if plan.evaluates_at(state.step):
                    self.evaluate_validation()
                if plan.checkpoints_at(state.step):
                    if self.dist.is_main:
                        self.save_checkpoint()
                    self.dist.barrier()
        self.hooks.routing_stats()  # the recording ends with training
        return state

    def train_one_step(self, batches: Iterator[tuple[int, int, dict]]) -> StepOutcome:
        """Take the next optimizer step and account for it in the state (loss, tokens, time)."""
        state, started = self.state, time.perf_counter()
        taken = self.next_micro_batches(batches)
        try:
            outcome = self.training_step(self.train_model, [batch for _, _, batch in taken], self.loss)
        except NonFiniteLoss as err:
            epoch, index, _ = taken[err.micro_batch]
            raise TrainingDiverged(
                f"the loss became {err.value} at step {state.step + 1} (epoch {epoch}, batch {index}); "
                f"the last good checkpoint is kept at {self.checkpoints / LAST}. "
                f"Try a lower train.lr, precision=fp32 or a smaller train.grad_clip."
            ) from None
        state.step += 1
        state.running_loss += sum(outcome.losses)
        state.running_batches += len(outcome.losses)
        state.tokens += self.all_ranks_sum(outcome.tokens)
        state.train_seconds += time.perf_counter() - started
        return outcome

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.loss(model, batch, self.cfg.label_smoothing)

    def all_ranks_sum(self, value: int) -> int:
        if self.dist.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def best_validation(self) -> dict[str, Any] | None:
        """The validation metrics of the best checkpoint so far (None before the first evaluation)."""
        state = self.state
        if state.best_step is None:
            return None
        found = [h["validation"] for h in state.history if h["step"] == state.best_step]
        return found[-1] if found else {self.task.main_metric: state.best_metric}

    def evaluate_validation(self) -> None:
        """Validation metrics into the history (and train.log, the logger); best.pt when they improve."""
        state = self.state
        train_loss = state.running_loss / max(1, state.running_batches)
        if self.dist.world_size > 1:  # the loss of the global batch, not of this rank's share
            loss = torch.tensor([train_loss], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(loss)
            train_loss = loss.item() / self.dist.world_size
        state.running_loss, state.running_batches = 0.0, 0
        training_routing = self.hooks.routing_stats()  # the training forwards' since the last evaluation (fit)
        self.hooks.reset_routing_stats()  # where the routed layers send the validation pass's tokens
        metrics = self.evaluate("validation")
        routing = self.hooks.routing_stats()
        self.hooks.reset_routing_stats()  # training again
        value = metrics[self.task.main_metric]
        better = replaces_best(metrics, self.best_validation(), self.task.main_metric, self.task.greater_is_better)
        record = {
            "step": state.step,
            "loss": train_loss,
            "validation": metrics,
            "central_updates": self.mask.central_updates,
            "tokens": state.tokens,
        }
        if routing:  # models with routed expert layers
            record["routing"] = routing
        if training_routing:  # where a training capacity limit drops choices (validation has none); this rank's
            drift = "aux_drift"  # the evaluation's entry has it, from the same moment
            record["train_routing"] = {
                n: {k: v for k, v in e.items() if k != drift} for n, e in training_routing.items()
            }
        state.history.append(record)
        self.log(record)
        if self.progress is not None and self.dist.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            self.progress.write(f"step {state.step}: train loss {train_loss:.4f}, validation {shown}")
        if self.logger is not None and self.dist.is_main:
            self.logger.log(record)
        if better:
            state.best_metric, state.best_step = value, state.step
            if self.dist.is_main:
                atomic_torch_save(self.model.state_dict(), self.checkpoints / BEST)
