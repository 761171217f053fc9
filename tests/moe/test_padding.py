"""Padding never routes: a padded batch's real tokens route (expert, gate, capacity, aux loss) and come out exactly as
the same tokens without padding, in one layer and through tiny T5, BERT and GPT-2 models; padding gets no expert."""

from __future__ import annotations

import pytest
import torch

from mpoe_exp import build_model, compose_config
from mpoe_exp.config import run_spec
from mpoe_exp.moe import DROPPED, FeedForwardSpec, build_layer, build_moe_layer, expert_layers, moe_layers

D, E = 8, 4
SPEC = FeedForwardSpec(d_model=D, d_ff=16, activation="relu")
LENGTHS = [5, 2, 7]  # real tokens of each sequence, padded to WIDTH
WIDTH = 9


def switch(capacity_factor: float | None = 0.5) -> dict:
    router = {
        "type": "switch",
        "jitter": 0.01,
        "capacity_factor_train": capacity_factor,
        "capacity_factor_eval": capacity_factor,
        "balance_loss_coef": 0.01,
        "z_loss_coef": 0.001,
        "straight_through": False,  # gates are router probabilities: a wrong gate shows in the output
    }
    return {"experts": "dense", "num_experts": E, "router": router}


def moe() -> dict:
    router = {"type": "noisy_top_k", "top_k": 2, "noisy": True, "importance_loss_coef": 0.01, "load_loss_coef": 0.01}
    return {"experts": "dense", "num_experts": E, "router": router}


METHODS = {"switch": switch, "moe": moe, "meo_token": lambda: {**moe(), "layer": "meo", "level": "token"}}


def perturbed_layer(method: dict):
    """An upcycled layer whose experts and router are all different (routing shows in the output)."""
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*SPEC.matrix_shape(n), generator=g) for n in SPEC.matrix_names}
    layer = build_layer(SPEC, method, weights) if "layer" in method else build_moe_layer(SPEC, method, weights)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return layer


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """x (3, WIDTH, D) and its mask; every padding position holds the first token's vector, so that counted
    padding would crowd that token's expert."""
    x = torch.randn(len(LENGTHS), WIDTH, D, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    x[~mask] = x[0, 0].clone()
    return x, mask


def call(layer, x, mask=None, seed=5):
    torch.manual_seed(seed)  # the same jitter / router noise for the same real tokens
    layer.token_mask = mask
    try:
        return layer(x)
    finally:
        layer.token_mask = None


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(METHODS))
def test_padding_routes_nowhere_and_real_tokens_route_as_without_it(name, training):
    layer = perturbed_layer(METHODS[name]()).train(training)
    x, mask = padded_batch()
    got = call(layer, x, mask.long())
    got_aux, got_counts = layer.aux_loss, layer.expert_counts
    want = call(layer, x[mask][None])  # the same tokens, one unpadded sequence after another
    torch.testing.assert_close(got[mask], want[0], rtol=0, atol=0)
    assert not got[~mask].any(), "padding goes to no expert"
    torch.testing.assert_close(got_aux, layer.aux_loss, rtol=0, atol=0)
    assert got_counts.tolist() == layer.expert_counts.tolist()


def test_the_capacity_in_that_test_binds_when_padding_counts():
    """Without the mask the padded batch routes differently: the test above checks something."""
    layer = perturbed_layer(switch()).eval()
    x, mask = padded_batch()
    unmasked, masked = call(layer, x)[mask], call(layer, x, mask.long())[mask]
    assert not torch.equal(unmasked, masked)


def test_switch_router_leaves_padding_out_of_capacity_and_losses():
    layer = perturbed_layer(switch()).eval()
    x, mask = padded_batch()
    flat, real = x.reshape(-1, D), mask.reshape(-1)
    routing = layer.router.route(flat, real)
    alone = layer.router(flat[real])
    assert (routing.expert_index[~real] == DROPPED).all() and not routing.gate[~real].any()
    assert torch.equal(routing.expert_index[real], alone.expert_index)
    assert torch.equal(routing.gate[real], alone.gate) and torch.equal(routing.aux_loss, alone.aux_loss)
    assert (alone.expert_index == DROPPED).any(), "the capacity must drop some real tokens"
    assert not routing.router_probs[~real].any()


def test_a_call_of_padding_only_has_no_routing_and_a_zero_aux_loss():
    layer = perturbed_layer(switch()).train()
    out = call(layer, torch.randn(2, 3, D), torch.zeros(2, 3, dtype=torch.long))
    assert not out.any() and layer.aux_loss.item() == 0.0 and layer.expert_counts.sum() == 0


# --- through tiny models: the model hands each call's mask to its layers -----------------------------------------

PAD = 4  # padding columns added


def capture_outputs(model) -> dict:
    outputs = {}
    for name, layer in model.named_modules():
        if layer in expert_layers(model):
            layer.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    return outputs


def model_call(family: str, padded: bool) -> tuple[dict, dict]:
    """(inputs, where the real positions are: name prefix -> number of real positions) of a batch of 3 sequences of
    8 tokens (T5: 5 target tokens), with PAD padding columns appended when `padded`."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 250, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    pad_id = {"t5": 0, "bert": 0, "gpt2": 256}[family]
    if padded:
        ids = torch.cat([ids, torch.full((3, PAD), pad_id)], dim=1)
        mask = torch.cat([mask, torch.zeros(3, PAD, dtype=torch.long)], dim=1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        labels = torch.randint(3, 250, (3, 5), generator=g)
        if padded:
            labels = torch.cat([labels, torch.full((3, PAD), -100)], dim=1)
        inputs["labels"] = labels
        return inputs, {"encoder.": 8, "decoder.": 5}
    return inputs, {"": 8}


@pytest.mark.parametrize("family", ["t5", "bert", "gpt2"])
def test_padding_changes_no_layer_output_at_real_tokens_of_a_tiny_model(family):
    """A Switch capacity that binds: counted padding would drop other real tokens and enlarge the capacity."""
    overrides = ["method=switch", "method.router.capacity_factor_eval=1.0"]
    model, _ = build_model(run_spec(compose_config([f"model=tiny-{family}", *overrides])))
    model.eval()
    outputs = capture_outputs(model)
    results = []
    for padded in (False, True):
        inputs, real = model_call(family, padded)
        with torch.no_grad():
            logits = model(**inputs).logits
        counts = {id(m): m.expert_counts.tolist() for m in moe_layers(model)}
        results.append((dict(outputs), logits, counts, real))
    (plain, plain_logits, plain_counts, real), (padded, padded_logits, padded_counts, _) = results
    for name, out in plain.items():
        width = next(n for prefix, n in real.items() if name.startswith(prefix))
        torch.testing.assert_close(padded[name][:, :width], out[:, :width], rtol=1e-5, atol=1e-5, msg=name)
        assert not padded[name][:, width:].any(), f"{name}: padding went to an expert"
    assert padded_counts == plain_counts
    width = {"t5": 5, "gpt2": 8, "bert": None}[family]  # BERT: one prediction a sequence
    torch.testing.assert_close(padded_logits[:, :width] if width else padded_logits, plain_logits, rtol=1e-5, atol=1e-5)


def test_t5_generation_hands_no_stale_mask_to_the_decoder():
    """After a call with labels, a call without them (generation's decoder steps) routes every decoder token."""
    model, _ = build_model(run_spec(compose_config(["model=tiny-t5", "method=switch"])))
    model.eval()
    inputs, _ = model_call("t5", padded=True)
    with torch.no_grad():
        model(**inputs)
        inputs["decoder_input_ids"] = inputs.pop("labels")[:, :7].clamp(min=0)
        model(**inputs)
    assert all(m.expert_counts.sum() == 3 * 7 for m in moe_layers(model.decoder))
    assert all(m.token_mask is None for m in expert_layers(model)), "masks are handed over for one call only"
