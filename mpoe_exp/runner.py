"""One experiment run: config -> model -> task -> train -> best checkpoint on validation -> test -> results.json."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mpoe_exp import results
from mpoe_exp.config import method_label
from mpoe_exp.errors import UserError
from mpoe_exp.models import build_model, parameter_report


def run(cfg: DictConfig) -> Path:
    """Run (or resume, or skip if finished) the experiment of `cfg`; returns its run directory."""
    from mpoe_exp.loggers import WANDB_RUN_ID_FILE, NullLogger, make_logger
    from mpoe_exp.tasks.tasks import build_task
    from mpoe_exp.training import Trainer, TrainingDiverged, resolve_device, seed_everything, setup_distributed

    directory = results.run_dir(cfg)
    dist = setup_distributed()
    if results.is_finished(directory) and not cfg.force:
        print(f"already finished: {directory / results.RESULTS_FILE} (force=true runs it again)")
        return directory
    if cfg.force and dist.is_main:
        for name in (
            "checkpoints/last.pt",
            "checkpoints/best.pt",
            results.RESULTS_FILE,
            "train.log",
            WANDB_RUN_ID_FILE,
        ):
            (directory / name).unlink(missing_ok=True)
    dist.barrier()
    directory.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, dist)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)
    seed_everything(cfg.seed)
    model, tokenizer = build_model(cfg)
    model.to(device)
    task = build_task(cfg, tokenizer)
    parameters = parameter_report(model)
    logger = make_logger(cfg, directory, parameters) if dist.is_main else NullLogger()
    trainer = Trainer(model, task, cfg.train, cfg.method, directory, cfg.seed, device, logger, dist)
    summary = {
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "table_model": results.table_model(cfg),
        "method": cfg.method.name,
        "method_label": method_label(cfg),
        "ablation": cfg.ablation.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "hparams": results.hparams(cfg),
        "main_metric": task.main_metric,
        "greater_is_better": task.greater_is_better,
        "split_sizes": task.split_sizes,
        "world_size": dist.world_size,
        "parameters": parameters,
        "code_version": results.code_version(),
        "library_versions": results.library_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        state = trainer.fit()
    except TrainingDiverged as err:
        if dist.is_main:
            results.write_results(directory, {"status": "failed", "error": str(err), **summary})
        logger.finish({"status": "failed"})
        raise
    trainer.load_best()
    best = next(h for h in state.history if h["step"] == state.best_step)
    test_metrics = trainer.evaluate("test")
    if not dist.is_main:
        return directory
    path = results.write_results(
        directory,
        {
            "status": "finished",
            **summary,
            "validation": best["validation"],
            "test": test_metrics,
            "best_step": state.best_step,
            "steps": state.step,
            "central_updates": trainer.mask.central_updates,
            "history": state.history,
            "wall_time_s": trainer.wall_seconds(),  # adds up across resumes
            "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
        },
    )
    logger.finish({"test": test_metrics, "best_validation": best["validation"], "best_step": state.best_step})
    print(f"results: {path}")
    print(f"  validation {task.main_metric} = {best['validation'][task.main_metric]:.4f} (step {state.best_step})")
    print(f"  test       {task.main_metric} = {test_metrics[task.main_metric]:.4f}")
    return directory


def check_task_fits_model(cfg: DictConfig) -> None:
    """Refuse a task the model family cannot do, before any work starts."""
    if "task" not in cfg or cfg.task is None:
        raise UserError("no task chosen: add task=<name> (e.g. task=cola or task=wikitext2)")
    families = list(cfg.task.families)
    if cfg.model.family not in families:
        raise UserError(
            f"task={cfg.task.name} runs on {' or '.join(families)} models, not model={cfg.model.name} "
            f"({cfg.model.family}); GLUE uses T5 (text-to-text), WikiText-2/IMDB/EMNLP News use GPT-2"
        )
