"""A new expert-layer kind is one module plus one registry line: this file defines one (a Switch layer that records
what the model gives it), registers it, and trains, evaluates and generates with it on tiny-t5 and tiny-gpt2, with
no edit to mpoe_exp. What it needs from the backbone (the encoder's attention mask, the whole prefix in generation)
it declares; the backbone and generation code read the declaration."""

from __future__ import annotations

import json

import pytest
import torch

from mpoe_exp import build_model, compose_config
from mpoe_exp.config import DEMO_DATA_DIR, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.moe import LAYER_KINDS, DenseExperts, LayerKind, MoEFeedForward, placement, router_of
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run
from mpoe_exp.tasks.tasks import build_task


class RecordingLayer(MoEFeedForward):
    """Switch routing over dense experts, recording the token masks and sequence lengths it is called with."""

    uses_token_mask = True
    needs_full_sequence = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks_seen, self.lengths = 0, []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.masks_seen += self.token_mask is not None
        self.lengths.append(hidden_states.shape[1])
        return super().forward(hidden_states)


def build_recording_layer(spec, method, weights=None, biases=None, *, causal=False, device=None, dtype=None):
    device, dtype = placement(weights, device, dtype)
    if weights is None:
        experts = DenseExperts(spec, method["num_experts"], device=device, dtype=dtype)
    else:
        experts = DenseExperts.from_dense(spec, method["num_experts"], dict(weights), dict(biases or {}))
    return RecordingLayer(spec, router_of(method, spec.d_model, device), experts)


@pytest.fixture
def recording_kind(monkeypatch):
    monkeypatch.setitem(LAYER_KINDS, "recording", LayerKind(build_recording_layer, ("dense",), ("switch",)))


RUNS = {
    "tiny-t5": ["task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"],
    "tiny-gpt2": [
        "task=wikitext2",
        f"data_dir={DEMO_DATA_DIR / 'wikitext2'}",
        "task.block_size=64",
        "task.num_samples=2",
        "task.sample_length=4",
    ],
}


@pytest.mark.parametrize("model", RUNS)
def test_a_layer_kind_registered_outside_the_package_trains_evaluates_and_generates(recording_kind, tmp_path, model):
    overrides = [f"model={model}", "method=switch", "+method.layer=recording", *RUNS[model]]
    cfg = compose_config([*overrides, f"runs_dir={tmp_path}", "train.max_steps=4", "train.batch_size=4"])
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished" and results["steps"] == 4

    built, tokenizer = build_model(run_spec(cfg))
    layers = [m for m in built.modules() if isinstance(m, RecordingLayer)]
    assert layers and not [m for m in built.modules() if type(m) is MoEFeedForward]
    build_task(run_spec(cfg), tokenizer).evaluate(built.eval(), "test", 8, "cpu")  # T5: greedy labels; GPT-2: samples
    lengths = layers[-1].lengths  # the last layer: T5's last decoder block, GPT-2's last block
    assert 2 in lengths and 3 in lengths, "generation must re-run the whole prefix at each step"
    if model == "tiny-t5":
        encoder_layers = [m for m in built.encoder.modules() if isinstance(m, RecordingLayer)]
        assert all(m.masks_seen for m in encoder_layers)  # handed over because the layer declares uses_token_mask


def test_generation_reads_the_declaration(recording_kind):
    from mpoe_exp.moe import needs_full_sequence

    cfg = compose_config(["model=tiny-gpt2", "method=switch", "+method.layer=recording"])
    assert needs_full_sequence(build_model(run_spec(cfg))[0])
    assert not needs_full_sequence(build_model(run_spec(compose_config(["model=tiny-gpt2", "method=switch"])))[0])


def test_a_key_or_router_the_kind_does_not_take_is_refused(recording_kind):
    with pytest.raises(UserError, match="method.recompute"):
        compose_config(["model=tiny-t5", "method=switch", "+method.layer=recording", "+method.recompute=true"])
    with pytest.raises(UserError, match="takes router type switch"):
        compose_config(["model=tiny-t5", "method=moe", "+method.layer=recording"])


def test_unknown_layer_kinds_and_routers_name_the_known_ones():
    from mpoe_exp.moe import ROUTERS, build_layer

    with pytest.raises(UserError, match="known: adapter_moe, cartesian, meo, moe"):
        LAYER_KINDS["nope"]
    with pytest.raises(UserError, match="known: group_top1, noisy_top_k, switch, switch_top_k"):
        ROUTERS["nope"]
    with pytest.raises(UserError, match="known: adapter_moe, cartesian, meo, moe"):
        build_layer(None, {"layer": "nope"})
