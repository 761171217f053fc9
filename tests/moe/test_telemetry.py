"""Routing telemetry: every validation evaluation records, per routed layer, the experts' load, its entropy, the
fraction dropped by capacity and (MPO) each expert's drift from its upcycled start, and the same of the training
forwards since the previous evaluation; padding never counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpoe_exp import build_model, compose_config
from mpoe_exp.config import DEMO_DATA_DIR, run_spec
from mpoe_exp.loggers import flatten
from mpoe_exp.models import head_config, load_backbone, parameter_report, upcycle
from mpoe_exp.moe import DROPPED, RoutedLayer, reset_routing_stats, routing_stats, routing_summary
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run


def routed_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def check_entry(entry: dict, num_experts: int) -> None:
    load = entry["load"]
    assert len(load) == num_experts and all(p >= 0 for p in load)
    assert sum(load) == pytest.approx(1.0, abs=1e-12)
    assert entry["entropy"] == pytest.approx(-sum(p * math.log(p) for p in load if p > 0), abs=1e-12)
    assert 0.0 <= entry["entropy"] <= math.log(num_experts) + 1e-12
    assert 0.0 <= entry["dropped"] <= 1.0


RUNS = {
    "tiny-bert": ["task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"],
    "tiny-t5": ["task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"],
}


RUN_METHODS = [("tiny-bert", "switch"), ("tiny-bert", "moe"), ("tiny-bert", "mpoe"), ("tiny-bert", "dense")]


@pytest.mark.parametrize("model,method", [*RUN_METHODS, ("tiny-t5", "switch")])
def test_every_validation_records_the_routing_of_every_routed_layer(tmp_path, capsys, model, method):
    overrides = [f"model={model}", f"method={method}", *RUNS[model], f"runs_dir={tmp_path}"]
    cfg = compose_config([*overrides, "train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "train.lr=1e-2"])
    directory = run(cfg)
    history = json.loads((directory / RESULTS_FILE).read_text())["history"]
    logged = [json.loads(line) for line in (directory / "train.log").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    if method == "dense":
        assert not any("routing" in h for h in history + logged)
        assert "routing:" not in capsys.readouterr().out
        return
    names = routed_names(build_model(run_spec(cfg))[0])
    for record in history:
        assert list(record["routing"]) == names  # every routed layer, in module order
        for entry in record["routing"].values():
            check_entry(entry, cfg.method.num_experts)
            assert entry["dropped"] == 0.0  # no capacity limit in evaluation
            if method == "mpoe":
                assert len(entry["aux_drift"]) == cfg.method.num_experts
                assert min(entry["aux_drift"]) >= 0 and max(entry["aux_drift"]) > 0, "experts that got tokens moved"
            else:
                assert "aux_drift" not in entry
    assert logged[-1]["routing"] == history[-1]["routing"]  # train.log too
    out = capsys.readouterr().out
    assert "routing: most loaded expert" in out and "least loaded expert" in out


def test_each_evaluation_also_records_the_training_routing_since_the_last_one(tmp_path):
    """History entries carry "train_routing": the routing of the training forwards since the previous evaluation,
    where a training capacity limit drops choices (the validation pass has none). Capacity factor 0.5: an expert
    takes at most half its even share, so at least half of every layer's choices are dropped in training."""
    overrides = ["model=tiny-bert", "method=switch", *RUNS["tiny-bert"], f"runs_dir={tmp_path}"]
    cfg = compose_config([*overrides, "train.max_steps=4", "train.eval_every=2", "train.batch_size=8",
                          "method.router.capacity_factor_train=0.5"])  # fmt: skip
    directory = run(cfg)
    history = json.loads((directory / RESULTS_FILE).read_text())["history"]
    names = routed_names(build_model(run_spec(cfg))[0])
    for record in history:
        assert list(record["train_routing"]) == names
        for name, entry in record["train_routing"].items():
            check_entry(entry, cfg.method.num_experts)
            assert entry["dropped"] >= 0.5 and record["routing"][name]["dropped"] == 0.0
            assert "aux_drift" not in entry  # the evaluation's entry has it, at the same moment


def perturbed_switch_model(capacity_factor=None):
    limit = "null" if capacity_factor is None else capacity_factor
    overrides = ["model=tiny-bert", "method=switch", f"method.router.capacity_factor_eval={limit}"]
    model, _ = build_model(run_spec(compose_config(overrides)))
    with torch.no_grad():  # decisive routers: tokens spread over the experts unevenly
        for layer in model.modules():
            if isinstance(layer, RoutedLayer):
                layer.router.classifier.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    return model.eval()


def bert_batch(lengths, width, seed=0):
    ids = torch.randint(5, 250, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def recorded(model, *batches) -> dict:
    reset_routing_stats(model)
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return routing_stats(model)


def test_dropped_is_the_fraction_of_real_choices_over_capacity_and_padding_never_counts():
    model = perturbed_switch_model(capacity_factor=0.5)
    layer = next(m for m in model.modules() if isinstance(m, RoutedLayer))
    seen = []
    layer.router.register_forward_hook(lambda m, args, routing: seen.append(routing.expert_index[:, 0]))
    plain = recorded(model, bert_batch([12, 12, 12], 12))
    chosen = seen[-1]
    padded = recorded(model, {k: torch.cat([v, 0 * v[:, :5]], dim=1) for k, v in bert_batch([12, 12, 12], 12).items()})
    kept = chosen[chosen != DROPPED]
    entry = plain[routed_names(model)[0]]
    assert entry["dropped"] == (chosen == DROPPED).sum().item() / chosen.numel() > 0
    assert entry["load"] == (torch.bincount(kept, minlength=8).double() / kept.numel()).tolist()
    assert padded == plain


def test_counts_add_up_over_the_pass_and_restart_at_each_reset():
    model = perturbed_switch_model()  # no capacity: each token's choice is its own
    first, second = bert_batch([7, 12, 3], 12, seed=1), bert_batch([9, 4], 12, seed=2)
    both = {k: torch.cat([first[k], second[k]]) for k in first}
    assert recorded(model, first, second) == recorded(model, both)
    assert recorded(model, first) != recorded(model, both)
    assert routing_stats(model) == {}, "reading ends the recording"


def test_aux_drift_is_zero_at_the_upcycled_start_and_measured_from_it_after_a_rebuild():
    cfg = compose_config(["model=tiny-bert", "method=mpoe"])
    model, _ = build_model(run_spec(cfg))
    batch = bert_batch([5, 9], 9)
    start = recorded(model.eval(), batch)
    assert start and all(entry["aux_drift"] == [0.0] * 8 for entry in start.values())
    with torch.no_grad():  # training moves the auxiliary tensors (expert 3 most)
        for name, p in model.named_parameters():
            if ".auxiliary." in name:
                p[3].mul_(1.5)
                p.add_(1e-3)
    moved = recorded(model, batch)
    for entry in moved.values():
        assert entry["aux_drift"][3] == pytest.approx(0.5, rel=1e-2) and 0 < max(entry["aux_drift"][:3]) < 0.1
    # a resumed run builds its model by upcycling again, then loads the checkpoint: the start is the upcycled one
    rebuilt, _ = build_model(run_spec(cfg))
    rebuilt.load_state_dict(model.state_dict())
    assert recorded(rebuilt.eval(), batch) == moved
    # the copy is neither a parameter nor in the state dict: the keys and counts of a model built empty (load_model,
    # and what checkpoints from before the telemetry hold), which loads it and has no start to drift from
    spec = run_spec(cfg)
    empty = upcycle(load_backbone(spec.model, head=head_config(spec)), spec.method, from_weights=False)
    assert set(empty.state_dict()) == set(model.state_dict()) and parameter_report(empty) == parameter_report(model)
    empty.load_state_dict(model.state_dict())
    assert all("aux_drift" not in entry for entry in recorded(empty.eval(), batch).values())


def test_cartesian_reports_each_sublayer_and_meo_counts_each_sequences_real_tokens():
    model, _ = build_model(run_spec(compose_config(["model=tiny-bert", "method=cartesian"])))
    stats = recorded(model.eval(), bert_batch([5, 9], 9))
    assert [name.rsplit(".", 1)[1] for name in stats] == ["a", "b"] * 2
    for entry in stats.values():  # one choice in each group of 4 experts
        check_entry(entry, 8)
        assert sum(entry["load"][:4]) == pytest.approx(0.5) and sum(entry["load"][4:]) == pytest.approx(0.5)

    model, _ = build_model(run_spec(compose_config(["model=tiny-bert", "method=meo"])))
    layers = [m for m in model.modules() if isinstance(m, RoutedLayer)]
    seen = []
    layers[0].router.register_forward_hook(lambda m, args, routing: seen.append(routing.expert_index))
    stats = recorded(model.eval(), bert_batch([5, 9], 9))
    load = torch.zeros(8, dtype=torch.float64)
    for choices, tokens in zip(seen[0], [5, 9]):
        load[choices] += tokens
    assert stats[routed_names(model)[0]]["load"] == (load / load.sum()).tolist()


def test_the_logger_gets_per_expert_numbers_and_the_summary_names_the_extremes():
    routing = {"encoder.0.mlp": {"load": [0.25, 0.75], "entropy": 0.56, "dropped": 0.0, "aux_drift": [0.1, 0.2]}}
    flat = flatten({"step": 3, "routing": routing})
    assert flat["routing/encoder.0.mlp/load/1"] == 0.75 and flat["routing/encoder.0.mlp/aux_drift/0"] == 0.1
    assert flat["routing/encoder.0.mlp/entropy"] == 0.56
    routing["decoder.1.mlp"] = {"load": [0.9, 0.1], "entropy": 0.3, "dropped": 0.0}
    assert routing_summary(routing) == [
        "routing: most loaded expert 0 of layer decoder.1.mlp (90%), least loaded expert 1 of layer decoder.1.mlp (10%)"
    ]
    assert routing_summary(None) == routing_summary({}) == []
