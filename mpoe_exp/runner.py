"""One experiment run: config -> model -> task -> train -> best checkpoint on validation -> test -> results.json."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mpoe_exp import cpu_malloc, results
from mpoe_exp.config import method_label, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.models import build_model, parameter_report
from mpoe_exp.run_record import RunRecord


def run(cfg: DictConfig) -> Path:
    """Run (or resume, or skip if finished) the experiment of `cfg`; returns its run directory."""
    from mpoe_exp.loggers import WANDB_RUN_ID_FILE, NullLogger
    from mpoe_exp.tasks.tasks import build_task
    from mpoe_exp.training import (
        LAST,
        Trainer,
        TrainingDiverged,
        resolve_device,
        seed_everything,
        setup_distributed,
    )

    spec = run_spec(cfg)  # typed, once; the modules below receive it
    directory = results.run_dir(cfg)
    digest = results.config_hash(cfg)
    dist = setup_distributed()
    if not cfg.force and check_finished(directory, digest):
        return directory
    if cfg.force and dist.is_main:
        outputs = ("checkpoints/last.pt", "checkpoints/best.pt", results.RESULTS_FILE, "train.log", WANDB_RUN_ID_FILE)
        for name in outputs:
            (directory / name).unlink(missing_ok=True)
    dist.barrier()
    directory.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, dist)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.train.tf32
    seed_everything(cfg.seed)
    threads = cfg.get("cpu_threads", "auto")
    set_cpu_threads(threads, device, None)  # a number holds from the start: upcycling runs on those threads too
    model, tokenizer = build_model(spec)
    model.to(device)
    set_cpu_threads(threads, device, model)
    kept = set_cpu_malloc(cfg.get("cpu_malloc", "system"), device)
    task = build_task(spec, tokenizer)
    parameters = parameter_report(model)
    logger = run_logger(cfg, directory, parameters) if dist.is_main else NullLogger()
    trainer = Trainer(model, task, spec.train, directory, cfg.seed, device, logger, dist, digest)
    if dist.is_main:
        print_plan(cfg, directory, digest, device, parameters, trainer, kept)
    summary = run_summary(cfg, digest, task, dist.world_size, parameters)
    try:
        state = trainer.fit()
    except TrainingDiverged as err:
        if dist.is_main:
            results.write_results(directory, RunRecord(status="failed", error=str(err), **summary))
        logger.finish({"status": "failed"})
        raise
    trainer.load_best()
    best = next(h for h in state.history if h["step"] == state.best_step)
    test_metrics = trainer.evaluate("test")
    if not dist.is_main:
        return directory
    path = results.write_results(directory, finished_record(summary, state, trainer, best, test_metrics))
    # the resume checkpoint (weights, optimizer moments, RNG) is never read once the run has finished
    (directory / "checkpoints" / LAST).unlink(missing_ok=True)
    logger.finish({"test": test_metrics, "best_validation": best["validation"], "best_step": state.best_step})
    print_outcome(path, task, best, test_metrics)
    return directory


def run_logger(cfg: DictConfig, directory: Path, parameters: dict[str, int]):
    """The run's logger (`logger=`), filing it under experiment/model/method/task, named by its seed."""
    from mpoe_exp.loggers import RunLabels, make_logger

    labels = RunLabels(
        directory=directory,
        group=f"{cfg.experiment_name}/{cfg.model.name}/{method_label(cfg)}/{cfg.task.name}",
        name=f"seed={cfg.seed}",
        parameters=parameters,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return make_logger(OmegaConf.to_container(cfg.logger, resolve=True), labels)


def run_summary(cfg: DictConfig, digest: str, task, world_size: int, parameters: dict[str, int]) -> dict:
    """What a run's record says before it trains (`RunRecord`'s fields; a failed run's is this and its error)."""
    return {
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "table_model": results.table_model(cfg),
        "method": cfg.method.name,
        "method_label": method_label(cfg),
        "ablation": cfg.ablation.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "hparams": results.hparams(cfg),
        "config_hash": digest,
        **{k: v for k, v in results.identity(cfg).items() if k.endswith("_fingerprint")},
        "main_metric": task.main_metric,
        "greater_is_better": task.greater_is_better,
        "split_sizes": task.split_sizes,
        "world_size": world_size,
        "parameters": parameters,
        "code_version": results.code_version(),
        "library_versions": results.library_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def finished_record(summary: dict, state, trainer, best: dict, test_metrics: dict) -> RunRecord:
    """The finished run's record: the summary, the best checkpoint's validation and test metrics, the history."""
    return RunRecord(
        status="finished",
        **summary,
        validation=best["validation"],
        test=test_metrics,
        best_step=state.best_step,
        steps=state.step,
        central_updates=trainer.mask.central_updates,
        history=state.history,
        wall_time_s=trainer.wall_seconds(),  # adds up across resumes
        tokens_per_second=state.tokens / state.train_seconds if state.train_seconds else None,
    )


def print_outcome(path: Path, task, best: dict, test_metrics: dict) -> None:
    """The finished run's last lines: where its results are, validation (best step), test, routing."""
    from mpoe_exp.moe import routing_summary

    print(f"results: {path}")
    print(f"  validation {describe_metric(task, best['validation'], 'validation')} (best of step {best['step']})")
    print(f"  test       {describe_metric(task, test_metrics, 'test')}")
    for line in routing_summary(best.get("routing")):  # the best checkpoint's evaluation, for routed layers
        print(f"  {line}")


# Below this many parameters a model's matmuls are too small to share between threads: with one more thread than
# free cores every op waits for the slowest thread (quickstart on a busy 2-core machine: 8 s with 1, 77-131 s with 2).
SMALL_MODEL_PARAMETERS = 20_000_000


def set_cpu_threads(setting, device: torch.device, model: torch.nn.Module | None) -> None:
    """`cpu_threads`: an int, or "auto": one thread for small models on CPU, torch's default otherwise (the model
    decides; with none, "auto" does nothing yet)."""
    if device.type != "cpu":
        return
    if setting == "auto":
        if model is None or sum(p.numel() for p in model.parameters()) >= SMALL_MODEL_PARAMETERS:
            return
        setting = 1
    torch.set_num_threads(int(setting))


def set_cpu_malloc(setting: str, device: torch.device) -> bool:
    """`cpu_malloc`: "keep" has glibc keep freed memory for reuse (mpoe_exp/cpu_malloc.py), "system" leaves malloc
    as it is; True if it was applied (only on CPU, only with glibc)."""
    return device.type == "cpu" and setting == "keep" and cpu_malloc.keep_freed_memory()


def print_plan(
    cfg: DictConfig, directory: Path, digest: str, device, parameters: dict, trainer, kept: bool = False
) -> None:
    """What a run is about to do, before its progress bar: where, on what, how big, how long."""
    counts = ", ".join(f"{k} {v:,}" for k, v in parameters.items())
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    threads += ", malloc keeps freed memory (cpu_malloc=keep)" if kept else ""
    evaluations = len(trainer.plan.evaluation_steps())
    print(f"run: {directory} (config {digest[:12]})")
    print(f"  model {cfg.model.name}, method {method_label(cfg)}, task {cfg.task.name}, seed {cfg.seed}")
    print(f"  device {device}, precision {cfg.train.precision}{threads}")
    print(f"  parameters: {counts}")
    print(
        f"  plan: {trainer.total_steps:,} optimizer steps ({trainer.plan.steps_per_epoch:,} per epoch, batch "
        f"{cfg.train.batch_size} x {cfg.train.grad_accum_steps} accumulation), validation every "
        f"{trainer.plan.eval_interval:,} steps ({evaluations} evaluations), resume checkpoint every "
        f"{trainer.plan.checkpoint_interval:,}"
    )


def check_finished(directory: Path, digest: str) -> bool:
    """True (and say where) if this config's run already finished in `directory`; a UserError if the folder holds
    another config's results (only an 8-digit hash prefix collision or a results file from an older version)."""
    if results.is_finished(directory, digest):
        print(f"already finished: {directory / results.RESULTS_FILE} (force=true runs it again)")
        return True
    previous = results.read_results(directory)
    if previous is not None and previous.finished:
        raise UserError(
            f"{directory / results.RESULTS_FILE} holds the results of another config "
            f"(config_hash {previous.config_hash}, this run's is {digest}); "
            f"move that folder away, or run with force=true to replace it"
        )
    return False


def describe_metric(task, metrics: dict, split: str) -> str:
    """`mcc = 41.27 (x100, 0 of 60 predictions unparsable)`: the main metric with its scale and what went wrong."""
    name = task.main_metric
    notes = ["x100, higher is better" if task.greater_is_better else "lower is better"]
    unparsable = metrics.get("unparsable")
    if unparsable is not None:
        total = (getattr(task, "split_sizes", None) or {}).get(split)
        notes.append(f"{int(unparsable)} of {total if total is not None else '?'} predictions unparsable")
        if total and unparsable == total:
            notes[-1] += ": the model has not learned the label strings yet (train longer, or a higher train.lr)"
    return f"{name} = {metrics[name]:.4f} ({', '.join(notes)})"


def check_task_fits_model(cfg: DictConfig) -> None:
    """Refuse a task the model family cannot do, before any work starts."""
    if "task" not in cfg or cfg.task is None:
        raise UserError("no task chosen: add task=<name> (e.g. task=cola or task=wikitext2)")
    from mpoe_exp.backbones import FAMILIES

    families = list(cfg.task.families)
    kinds = sorted({FAMILIES[family].kind for family in families})
    kind = FAMILIES[cfg.model.family].kind
    if kind not in kinds:
        raise UserError(
            f"task={cfg.task.name} runs on {' or '.join(families)} models, not model={cfg.model.name} "
            f"({cfg.model.family}, kind {kind}); a task runs on the families it names and on any other "
            f"{' or '.join(kinds)} family. GLUE uses T5 (text-to-text) or BERT (classifier), multi-task GLUE T5, "
            f"WikiText-2/IMDB/EMNLP News GPT-2"
        )
