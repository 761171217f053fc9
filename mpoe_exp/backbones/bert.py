"""BERT (and MiniLM): an encoder with a classifier over the pooled first token, for GLUE."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from mpoe_exp.backbones.base import Backbone, FFNSite, ModelShapes
from mpoe_exp.backbones.byte_level import byte_level_tokenizer
from mpoe_exp.errors import UserError
from mpoe_exp.moe import ExpertLayer, FeedForwardSpec

if TYPE_CHECKING:
    from mpoe_exp.glue_tasks import GlueTask


class Bert(Backbone):
    kind = "encoder"
    model_type = "bert"
    config_class_name = "BertConfig"
    model_class_name = "BertForSequenceClassification"
    token_mask_stacks = ("bert",)
    heads = ("num_attention_heads", "hidden_size")

    def byte_tokenizer(self):
        """ids 0-4 = [PAD], [UNK], [CLS], [SEP], [MASK], bytes from 5; "[CLS] a [SEP]" or "[CLS] a [SEP] b [SEP]"
        with token type 1 on the second segment, as BERT's tokenizer does."""
        return byte_level_tokenizer(
            before=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            unk_token="[UNK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )

    def head_config(self, glue_task: GlueTask | None) -> dict[str, Any]:
        """A classifier with the task's number of labels (one output, regression, for STS-B); two labels without
        a task (a bare dry run)."""
        if glue_task is not None and glue_task.num_labels is None:  # regression
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": glue_task.num_labels if glue_task else 2, "problem_type": "single_label_classification"}

    def ffn_sites(self, model: nn.Module) -> Iterator[FFNSite]:
        """BERT's FFN, out = W_o act(W_i x + b_i) + b_o, spans BertIntermediate (W_i, act) and BertOutput's dense
        (W_o); BertOutput then applies dropout, the residual and LayerNorm. The expert layer replaces
        BertIntermediate and computes the whole FFN; BertOutput's dense becomes the identity."""
        from transformers.models.bert.modeling_bert import BertLayer

        config = model.config
        for layer in list(model.modules()):
            if not isinstance(layer, BertLayer) or isinstance(layer.intermediate, ExpertLayer):
                continue
            if not isinstance(config.hidden_act, str) or config.hidden_act not in ("gelu", "relu", "gelu_new"):
                raise UserError(f"unsupported BERT activation {config.hidden_act!r}; expected gelu, gelu_new or relu")
            up, down = layer.intermediate.dense, layer.output.dense
            spec = FeedForwardSpec(
                d_model=config.hidden_size, d_ff=config.intermediate_size, activation=config.hidden_act, bias=True
            )
            yield FFNSite(
                layer,
                "intermediate",
                spec,
                {"wi": up.weight, "wo": down.weight},
                {"bi": up.bias, "bo": down.bias},
                causal=False,
                bypass=((layer.output, "dense"),),
            )

    def shapes(self, config) -> ModelShapes:
        return ModelShapes(
            d_model=config.hidden_size,
            d_ff=config.intermediate_size,
            gated=False,
            layers=config.num_hidden_layers,
            decoder_layers=0,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
        )
