"""GPT-2: a decoder for causal language modelling and unconditional generation (paper section 4.1)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from mpoe_exp.backbones.base import Backbone, FFNSite, ModelShapes
from mpoe_exp.backbones.byte_level import byte_level_tokenizer
from mpoe_exp.moe import FeedForwardSpec


class GPT2(Backbone):
    kind = "decoder"
    model_type = "gpt2"
    config_class_name = "GPT2Config"
    model_class_name = "GPT2LMHeadModel"
    token_mask_stacks = ("transformer",)
    embedding_prefixes = ("transformer.wte", "transformer.wpe", "lm_head.")
    heads = ("n_head", "n_embd")

    def byte_tokenizer(self):
        """Bytes 0..255, then <|endoftext|> = 256: GPT-2's start, end and padding token."""
        end = "<|endoftext|>"
        return byte_level_tokenizer(after=(end,), bos_token=end, eos_token=end, pad_token=end)

    def ffn_sites(self, model: nn.Module) -> Iterator[FFNSite]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        config = model.config
        for block in list(model.modules()):
            mlp = getattr(block, "mlp", None)
            if not isinstance(mlp, GPT2MLP):
                continue
            spec = FeedForwardSpec(
                d_model=config.n_embd,
                d_ff=mlp.c_fc.weight.shape[1],
                activation=config.activation_function,
                bias=True,
                output_dropout=config.resid_pdrop,
            )
            # Conv1D stores (in, out): transpose to the (out, in) convention of nn.Linear
            weights = {"wi": mlp.c_fc.weight.t(), "wo": mlp.c_proj.weight.t()}
            biases = {"bi": mlp.c_fc.bias, "bo": mlp.c_proj.bias}
            yield FFNSite(block, "mlp", spec, weights, biases, causal=True)

    def shapes(self, config) -> ModelShapes:
        return ModelShapes(
            d_model=config.n_embd,
            d_ff=config.n_inner or 4 * config.n_embd,
            gated=False,
            layers=config.n_layer,
            decoder_layers=0,
            vocab_size=config.vocab_size,
            max_positions=config.n_positions,
        )
