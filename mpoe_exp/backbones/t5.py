"""T5 (v1.0 ReLU and v1.1 gated FFNs): an encoder-decoder that runs GLUE as text-to-text (paper section 4.1)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from mpoe_exp.backbones.base import Backbone, FFNSite, ModelShapes
from mpoe_exp.backbones.byte_level import byte_level_tokenizer
from mpoe_exp.errors import UserError
from mpoe_exp.moe import ExpertLayer, FeedForwardSpec, hand_token_mask_to_layers


class T5(Backbone):
    kind = "encoder-decoder"
    model_type = "t5"
    config_class_name = "T5Config"
    model_class_name = "T5ForConditionalGeneration"
    token_mask_stacks = ("encoder",)
    embedding_prefixes = ("shared.", "lm_head.")

    def byte_tokenizer(self):
        """ids 0, 1, 2 = <pad>, </s>, <unk>, bytes from 3, and </s> appended to every sequence, as T5's tokenizer."""
        return byte_level_tokenizer(
            before=("<pad>", "</s>", "<unk>"),
            single="$A </s>",
            pair="$A </s> $B </s>",
            unk_token="<unk>",
            pad_token="<pad>",
            eos_token="</s>",
        )

    def ffn_sites(self, model: nn.Module) -> Iterator[FFNSite]:
        from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerFF

        config = model.config
        for name, module in list(model.named_modules()):
            if not isinstance(module, T5LayerFF) or isinstance(module.DenseReluDense, ExpertLayer):
                continue
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
            weights = {n: getattr(dense, n).weight for n in spec.matrix_names}
            yield FFNSite(module, "DenseReluDense", spec, weights, {}, causal=name.startswith("decoder."))

    def shapes(self, config) -> ModelShapes:
        return ModelShapes(
            d_model=config.d_model,
            d_ff=config.d_ff,
            gated=config.is_gated_act,
            layers=config.num_layers,
            decoder_layers=config.num_decoder_layers,
            vocab_size=config.vocab_size,
            max_positions=None,
        )

    def hand_token_masks(self, model: nn.Module) -> None:
        """The encoder: each call's attention_mask. The decoder: the positions that have a target,
        decoder_attention_mask when given, else labels != -100 (the targets are right-padded with -100 and HF
        shifts them into the decoder inputs: position t predicts label t). In generation neither is given and
        every decoder token routes: HF feeds a finished sequence pad tokens, but T5's pad id is also its decoder
        start token and one the model may emit, so the ids cannot tell padding."""
        super().hand_token_masks(model)
        decoder = getattr(model, "decoder", None)
        if decoder is not None:  # its mask comes from the model's call: the decoder stack never sees the labels
            hand_token_mask_to_layers(model, decoder_token_mask, decoder)


def decoder_token_mask(kwargs: dict[str, Any]):
    """T5's decoder positions that have a target (`T5.hand_token_masks`), (B, T), or None."""
    mask, labels = kwargs.get("decoder_attention_mask"), kwargs.get("labels")
    if mask is None and labels is not None:
        mask = labels != -100
    return mask
