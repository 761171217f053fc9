"""What a model family is: `Backbone`, the interface one file per family implements (t5.py, gpt2.py, bert.py).

A family names its transformers classes and says where its dense FFNs hang and what they compute (`ffn_sites`),
its offline byte-level tokenizer, the task head it needs, which stacks hand their token masks to the expert layers,
and the shapes the cost model and the MPO factorization read (`shapes`). Its `kind` says what tasks it runs:

- "encoder-decoder": text-to-text (GLUE as strings, T5);
- "decoder": causal language modelling and unconditional generation (GPT-2);
- "encoder": a classifier over the first token (BERT).

A task lists the families it was written for (`task.families`); it also runs on any family of the same kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpoe_exp.moe import FeedForwardSpec, hand_token_mask_to_layers

if TYPE_CHECKING:
    from mpoe_exp.glue_tasks import GlueTask

KINDS = ("encoder-decoder", "decoder", "encoder")


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


@dataclass(frozen=True)
class ModelShapes:
    """The sizes of a backbone that the cost model and the MPO factorization read, from its transformers config."""

    d_model: int
    d_ff: int
    gated: bool  # three FFN matrices (a gated activation) rather than two
    layers: int  # transformer layers of the encoder, or of the only stack
    decoder_layers: int  # layers of an encoder-decoder's decoder; 0 otherwise
    vocab_size: int
    max_positions: int | None  # learned positions (GPT-2, BERT); None for relative or rotary ones


class Backbone:
    """One model family. Subclasses set the class attributes and implement `ffn_sites`, `shapes` and
    `byte_tokenizer`; `head_config` and `hand_token_masks` have defaults."""

    kind: str  # one of KINDS
    model_type: str  # transformers' config.model_type of this family's models: how a built model is recognized
    config_class_name: str  # in transformers: the fields model.architecture.* takes
    model_class_name: str  # in transformers: the model with its head
    token_mask_stacks: tuple[str, ...] = ()  # attributes of the model whose calls carry attention_mask
    embedding_prefixes: tuple[str, ...] = ("lm_head.",)  # parameters the cost model counts as embeddings
    heads: tuple[str, str] | None = None  # (heads field, width field) when the heads must divide the width

    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.config_class_name)

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def byte_tokenizer(self):
        """The offline byte-level tokenizer (`model.tokenizer: byte`): one token per UTF-8 byte plus specials."""
        raise NotImplementedError

    def head_config(self, glue_task: GlueTask | None) -> dict[str, Any]:
        """Config fields of the task head for a GLUE task (None: no GLUE task); a language-model head needs none."""
        return {}

    def ffn_sites(self, model: nn.Module) -> Iterator[FFNSite]:
        """Every dense FFN of the model still in place, in order."""
        raise NotImplementedError

    def shapes(self, config) -> ModelShapes:
        """The sizes of a model of this family from its transformers config."""
        raise NotImplementedError

    def hand_token_masks(self, model: nn.Module) -> None:
        """Hand the expert layers that use a token mask (moe/kinds.py) each call's attention_mask, in every stack of
        `token_mask_stacks` (a decoder generating with a KV cache: the mask's last positions)."""
        for stack in self.token_mask_stacks:
            hand_token_mask_to_layers(getattr(model, stack, None))
