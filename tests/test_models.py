"""Upcycling, function preservation, save/load, parameter counts and the dry-run CLI."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpoe_exp import build_model, compose_config, load_model, save_model
from mpoe_exp.config import run_spec
from mpoe_exp.models import ffn_sites, parameter_report, upcycle
from mpoe_exp.moe import MoEFeedForward, MPOExperts, moe_layers

ROOT = Path(__file__).resolve().parent.parent

METHOD_FILES = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
METHODS = [
    ("moe", []),
    ("switch", []),
    ("mpoe", []),
    ("mpoe++", []),
    ("mpoe", ["ablation=no_sharing"]),
    ("mpoe", ["ablation=no_mask"]),
    ("mpoe", ["ablation=m3"]),
    ("mpoe", ["ablation=m7"]),
    ("mpoe", ["ablation=m9"]),
]
BACKBONES = [
    ("tiny-t5", []),
    ("tiny-t5", ["model.architecture.feed_forward_proj=gated-gelu"]),  # T5 v1.1 FFN
    ("tiny-gpt2", []),
    ("tiny-bert", []),
]


PT = {"return_tensors": "pt", "padding": True}


def model_inputs(cfg, tokenizer):
    if cfg.model.family == "bert":  # a sentence pair, with token types
        return dict(tokenizer(["the cat sat on the mat.", "short"], ["a cat", "a longer second one"], **PT))
    batch = tokenizer(["cola sentence: the cat sat on the mat.", "a shorter one"], return_tensors="pt", padding=True)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if cfg.model.family == "t5":
        inputs["decoder_input_ids"] = batch.input_ids[:, :6]
    return inputs


def real_logits(cfg, inputs, logits):
    """The logits at real tokens: GPT-2's padding positions are routed nowhere, so there they are not the dense
    model's (T5's logits are the decoder's, which has no padding here; BERT's one per sequence)."""
    return logits[inputs["attention_mask"].bool()] if cfg.model.family == "gpt2" else logits


@pytest.fixture(scope="module", params=BACKBONES, ids=lambda b: "-".join([b[0], *b[1]]))
def dense_model(request):
    name, overrides = request.param
    torch.manual_seed(0)
    cfg = compose_config([f"model={name}", "method=dense", *overrides])
    model, tokenizer = build_model(run_spec(cfg))
    model.eval()
    inputs = model_inputs(cfg, tokenizer)
    with torch.no_grad():
        logits = real_logits(cfg, inputs, model(**inputs).logits)
    return overrides, cfg, model, inputs, logits


@pytest.mark.parametrize("method,extra", METHODS, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_upcycled_model_equals_dense_at_initialization(dense_model, method, extra):
    overrides, cfg, dense, inputs, expected = dense_model
    method_cfg = compose_config([f"model={cfg.model.name}", f"method={method}", *overrides, *extra]).method
    model = upcycle(copy.deepcopy(dense), method_cfg).eval()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    arch = cfg.model.architecture
    layer_counts = {
        "t5": 2 * arch.get("num_layers", 0),
        "gpt2": arch.get("n_layer"),
        "bert": arch.get("num_hidden_layers"),
    }
    expected_layers = layer_counts[cfg.model.family]
    assert len(layers) == expected_layers
    assert not list(ffn_sites(model)), "every dense FFN must be replaced"
    with torch.no_grad():
        logits = real_logits(cfg, inputs, model(**inputs).logits)
    rel = (logits - expected).norm() / expected.norm()
    assert rel <= 1e-4, f"relative error {rel:.2e}"


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_method_equals_the_dense_model_at_initialization_by_default(dense_model, method):
    """Every config file in conf/method, as it is (no override): eval-mode logits within 1e-5 of the dense model's."""
    overrides, cfg, dense, inputs, expected = dense_model
    method_cfg = compose_config([f"model={cfg.model.name}", f"method={method}", *overrides]).method
    model = upcycle(copy.deepcopy(dense), method_cfg).eval()
    assert method == "dense" or not list(ffn_sites(model)), "every dense FFN must be replaced"
    with torch.no_grad():
        logits = real_logits(cfg, inputs, model(**inputs).logits)
    rel = (logits - expected).norm() / expected.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_switch_with_fedus_gate_is_not_the_identity(dense_model):
    """Fedus' gate scales by the router probability: the checks above would catch a gate that is not 1."""
    overrides, cfg, dense, inputs, expected = dense_model
    fedus = ["method.router.straight_through=false"]
    method_cfg = compose_config([f"model={cfg.model.name}", "method=switch", *overrides, *fedus]).method
    model = upcycle(copy.deepcopy(dense), method_cfg).eval()
    with torch.no_grad():
        logits = real_logits(cfg, inputs, model(**inputs).logits)
    assert (logits - expected).norm() / expected.norm() > 1e-3


def test_mpo_layers_share_one_central_tensor_per_matrix():
    cfg = compose_config(["model=tiny-t5", "method=mpoe"])
    model, _ = build_model(run_spec(cfg))
    experts = [m for m in model.modules() if isinstance(m, MPOExperts)]
    assert len(experts) == 4
    for e in experts:
        for name, central in e.central.items():
            assert central.dim() == 4  # (r, i, j, r'): no expert dimension
            assert all(aux.shape[0] == 8 for aux in e.auxiliary[name])
    no_sharing = compose_config(["model=tiny-t5", "method=mpoe", "ablation=no_sharing"])
    model, _ = build_model(run_spec(no_sharing))
    central = next(m for m in model.modules() if isinstance(m, MPOExperts)).central["wi"]
    assert central.dim() == 5 and central.shape[0] == 8


@pytest.mark.parametrize("method", ["mpoe", "switch", "moe", "mpoe++"])
@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-gpt2"])
def test_save_and_load_roundtrip(tmp_path, model_name, method):
    torch.manual_seed(1)
    cfg = compose_config([f"model={model_name}", f"method={method}"])
    model, tokenizer = build_model(run_spec(cfg))
    # move away from the upcycled initialization so that experts differ
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    inputs = model_inputs(cfg, tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_model(model, run_spec(cfg), tmp_path / "ckpt", tokenizer)
    loaded, loaded_tokenizer, loaded_cfg = load_model(tmp_path / "ckpt")
    loaded.eval()
    assert loaded_cfg.method["name"] == method
    assert parameter_report(loaded) == parameter_report(model)
    with torch.no_grad():
        logits = loaded(**model_inputs(cfg, loaded_tokenizer)).logits
    assert torch.equal(logits, expected)
    for experts in (m for m in loaded.modules() if isinstance(m, MPOExperts)):
        for central in experts.central.values():
            assert central.dim() == 4  # still one shared tensor, not one per expert


def test_load_model_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    from mpoe_exp import UserError

    with pytest.raises(UserError, match="not a saved mpoe-exp model"):
        load_model(tmp_path)


# Totals of docs/method.md, 'Parameter counts', counted on the meta device (no weights).
PAPER_SHAPED_TOTALS = [
    (["model=t5-base", "method=dense"], 222_903_552),
    (["model=t5-base", "method=mpoe"], 293_983_680),
    (["model=t5-base", "method=mpoe++"], 365_063_808),
    (["model=t5-large", "method=dense"], 737_668_096),
    (["model=t5-large", "method=mpoe"], 990_113_152),
    (["model=gpt2", "method=dense"], 124_439_808),
    (["model=gpt2", "method=mpoe"], 159_979_872),
]


@pytest.mark.parametrize(
    "overrides,total", PAPER_SHAPED_TOTALS, ids=lambda x: "-".join(x) if isinstance(x, list) else ""
)
def test_parameter_totals_match_the_reference_shapes(overrides, total):
    model, tokenizer = build_model(run_spec(compose_config(overrides)), meta=True)
    assert tokenizer is None
    assert parameter_report(model)["total"] == total


def test_switch_total_and_mpoe_split():
    switch = parameter_report(build_model(run_spec(compose_config(["model=t5-base", "method=switch"])), meta=True)[0])
    assert round(switch["total"] / 1e6, 1) == 1015.8
    mpoe = parameter_report(build_model(run_spec(compose_config(["model=t5-base", "method=mpoe"])), meta=True)[0])
    # 24 layers x 2 matrices: one shared central (= I*J = 2,359,296) each; 8 experts x 184,720 auxiliary each
    assert mpoe["expert_shared"] == 24 * 2 * 2_359_296
    assert mpoe["expert_specific"] == 24 * 2 * 8 * 184_720
    assert mpoe["router"] == 24 * 8 * (768 + 1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpoe_exp", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


# Linux carries the peak RSS of the memory a process replaces at exec into that process's own: a child started
# straight from a big pytest worker reports the worker's peak. So the command runs under a small Python process
# that starts it and reports its peak (os.wait4: that child's own, not the max over all children).
PEAK_WRAPPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_memory_of(command: list[str]) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and the command's own peak RSS in GB."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        done = subprocess.run(
            [sys.executable, "-c", PEAK_WRAPPER, str(peak), *command], capture_output=True, text=True, cwd=ROOT
        )
        return done.returncode, done.stdout, done.stderr, int(peak.read_text()) / 1024**2


def run_cli_with_peak_memory(*args: str) -> tuple[int, str, str, float]:
    return peak_memory_of([sys.executable, "-m", "mpoe_exp", *args])


def test_peak_memory_is_the_commands_own_not_the_test_processs():
    ballast = bytearray(1024**3)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # this process now peaks above 1 GB
    returncode, _, _, peak_gb = peak_memory_of([sys.executable, "-c", "pass"])
    del ballast
    assert returncode == 0 and peak_gb < 0.2


@pytest.mark.slow
def test_dry_run_cli_prints_counts_in_little_memory():
    """Its time is a benchmark, not a test: benchmarks/wall_time.py (BENCHMARKS.md, "Wall-clock time")."""
    returncode, stdout, stderr, peak_gb = run_cli_with_peak_memory("model=t5-base", "method=mpoe", "dry_run=true")
    assert returncode == 0, stderr
    assert "293,983,680" in stdout
    assert "paper: 294M" in stdout
    assert "expert-specific" in stdout and "shared by experts" in stdout
    assert peak_gb < 2


BAD_INPUT = [
    (["method=nonexistent"], "error: unknown method=nonexistent: method is one of adapters, cartesian, dense, meo"),
    (["model=nonexistent"], "error: unknown model=nonexistent: model is one of bert-base, gpt2, minilm, t5-base"),
    (["model=t5-base", "method=mpoe", "method.mpo.num_tensors=4"], "m = 4"),
    (["model=t5-base", "method=switch", "ablation=m3"], "only applies to MPO methods"),
    (
        ["model=t5-base", "method=mpoe", "method.mpo.factorizations={3072x768:[[4,4,8,6,4],[3,4,4,4,5]]}"],
        "does not match the matrix shape 3072 x 768",
    ),
]


# Each command is a fresh process (seconds of CPU importing torch): slow; the messages of all of them are checked in
# this process below, and test_runner.py runs one refused command in the fast tier.
@pytest.mark.slow
@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_cli_bad_input_gives_a_clear_message_and_no_traceback(args, message):
    result = run_cli(*args, "dry_run=true")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_refused_in_one_line_by_the_checks_the_dry_run_makes(args, message):
    from mpoe_exp.dry_run import dry_run
    from mpoe_exp.errors import UserError

    with pytest.raises(UserError) as refused:
        dry_run(run_spec(compose_config([*args, "dry_run=true"]), train=False))
    assert message in f"error: {refused.value}" and "\n" not in str(refused.value)


@pytest.mark.slow
def test_upcycling_t5_base_to_mpoexx_stays_under_3_gb():
    """Acceptance: the n expert copies are never materialized (peak measured in a fresh process)."""
    code = "import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks'); import upcycle_memory as u; u.main([])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1]
    peak_gb = float(row.split("|")[6].strip().split()[0])
    assert "365,063,808" in row
    assert peak_gb < 3.0, row


def test_upcycling_frees_each_dense_ffn_as_soon_as_it_is_replaced(monkeypatch):
    """While layer i is built, the weights of the FFNs replaced before it are already gone (no list keeps them)."""
    import gc
    import weakref

    import mpoe_exp.models as models

    model, _ = build_model(run_spec(compose_config(["model=tiny-t5"])))
    method = compose_config(["model=tiny-t5", "method=mpoe"]).method  # composing builds layers on meta: first
    refs = [weakref.ref(w) for site in ffn_sites(model) for w in site.weights.values()]
    per_site = len(refs) // len(list(ffn_sites(model)))
    built = []
    real_build_layer = models.build_layer

    def build_layer(*args, **kwargs):
        gc.collect()
        replaced = refs[: len(built) * per_site]
        built.append(sum(r() is not None for r in replaced))
        return real_build_layer(*args, **kwargs)

    monkeypatch.setattr(models, "build_layer", build_layer)
    upcycle(model, method)
    assert len(built) == len(refs) // per_site > 1
    assert built == [0] * len(built)


def test_pretrained_model_offline_gives_a_clear_error():
    from mpoe_exp import UserError

    cfg = compose_config(["model=t5-base"])
    with pytest.raises(UserError, match="model.path"):
        build_model(run_spec(cfg))


def test_local_checkpoint_by_path(tmp_path):
    """model.path loads a save_pretrained folder (how offline clusters use real checkpoints)."""
    torch.manual_seed(0)
    dense, tokenizer = build_model(run_spec(compose_config(["model=tiny-gpt2"])))
    dense.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = compose_config(
        ["model=tiny-gpt2", "model.pretrained=true", f"model.path={tmp_path}", "model.tokenizer=pretrained"]
    )
    model, loaded_tokenizer = build_model(run_spec(cfg))
    assert torch.equal(model.transformer.wte.weight, dense.transformer.wte.weight)
    assert loaded_tokenizer("abc").input_ids == tokenizer("abc").input_ids


@pytest.mark.gpu
@pytest.mark.parametrize("method", [m for m in METHOD_FILES if m != "dense"])
def test_upcycled_model_trains_on_cuda_in_bf16(method):
    cfg = compose_config(["model=tiny-t5", f"method={method}"])
    model, tokenizer = build_model(run_spec(cfg))
    model = model.cuda().train()
    inputs = {k: v.cuda() for k, v in model_inputs(cfg, tokenizer).items()}
    labels = inputs.pop("decoder_input_ids")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**inputs, labels=labels)
    from mpoe_exp.moe import collect_aux_loss

    loss = out.loss + collect_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    routers = [m.router for m in moe_layers(model)]
    assert routers and all(any(p.grad is not None for p in r.parameters()) for r in routers)


@pytest.mark.parametrize(
    "ablation,paper", [("m3", "130.3M"), ("m5", "157.4M"), ("m7", "198.7M"), ("m9", "214.6M"), ("no_sharing", "153M")]
)
def test_dry_run_prints_the_papers_figure_beside_ours(capsys, ablation, paper):
    from mpoe_exp.dry_run import dry_run

    report = dry_run(run_spec(compose_config(["model=gpt2", "method=mpoe", f"ablation={ablation}"]), train=False))
    out = capsys.readouterr().out
    assert f"paper: {paper}" in out
    assert f"{report['total']:,}" in out
    assert report["total"] > 124_439_808


@pytest.mark.parametrize("model_name,method", [("tiny-t5", "mpoe"), ("tiny-gpt2", "moe"), ("tiny-gpt2", "meo_token")])
def test_build_model_is_deterministic_for_a_config_and_leaves_the_global_rng_alone(model_name, method):
    """Random weights and router/noise initialization come from cfg.seed, not from the caller's RNG state."""
    cfg = compose_config([f"model={model_name}", f"method={method}", "seed=3"])
    torch.manual_seed(100)
    first, _ = build_model(run_spec(cfg))
    state = torch.get_rng_state()
    second, _ = build_model(run_spec(cfg))  # the global RNG has moved on (or not): the model must not care
    assert torch.equal(torch.get_rng_state(), state), "build_model must not consume the caller's RNG"
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other, _ = build_model(run_spec(compose_config([f"model={model_name}", f"method={method}", "seed=4"])))
    c = other.state_dict()
    embedding = "shared.weight" if model_name == "tiny-t5" else "transformer.wte.weight"
    assert not torch.equal(a[embedding], c[embedding])
    random_routers = [k for k in a if k.endswith("router.classifier.weight")]  # moe/meo routers start at zero
    assert (method == "mpoe") == bool(random_routers)
    assert all(not torch.equal(a[k], c[k]) for k in random_routers)


# --- MPO local tensors per ablation, and the README's parameter-count table ----------------------------------------


@functools.cache
def meta_parameter_report(overrides: tuple[str, ...]) -> dict[str, int]:
    """parameter_report of a model built on the meta device (cached: several tests count the same models)."""
    return parameter_report(build_model(run_spec(compose_config(list(overrides))), meta=True)[0])


@pytest.mark.parametrize("m", [3, 5, 7, 9])
@pytest.mark.parametrize("model_name", ["tiny-t5", "gpt2"])  # gpt2 on the meta device (shapes only)
def test_ablation_m_gives_m_local_tensors_per_mpo_matrix(model_name, m):
    cfg = compose_config([f"model={model_name}", "method=mpoe", f"ablation=m{m}"])
    assert cfg.method.mpo.num_tensors == m
    model, _ = build_model(run_spec(cfg), meta=model_name == "gpt2")
    experts = [e for e in model.modules() if isinstance(e, MPOExperts)]
    assert len(experts) == (4 if model_name == "tiny-t5" else 12)
    for e in experts:
        for name in e.spec.matrix_names:
            tensors = e.local_tensors(name)
            assert len(tensors) == m and len(e.auxiliary[name]) == m - 1
            assert tensors[m // 2] is e.central[name]
            assert all(t.dim() == 5 and t.shape[0] == cfg.method.num_experts for t in e.auxiliary[name])


def readme_parameter_table() -> list[tuple[list[str], int]]:
    """The rows of the README's "Parameter counts (dry run)" table as (overrides, our total)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Parameter counts (dry run)", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("model", "---") or not cells[2].replace(",", "").isdigit():
            continue
        model, method, ours = cells[0], cells[1], int(cells[2].replace(",", ""))
        name, _, variant = method.partition(",")
        overrides = [f"model={model}", f"method={name.split()[0]}"]
        variant = variant.strip().replace(" ", "")  # "no_sharing", "m=3"
        if variant:
            overrides.append(f"ablation={variant.replace('=', '')}")
        rows.append((overrides, ours))
    return rows


README_COUNTS = readme_parameter_table()


def test_the_readme_parameter_table_has_every_row():
    assert len(README_COUNTS) == 14 + 2 * len(METHOD_FILES)
    labels = [" ".join(o) for o, _ in README_COUNTS]
    assert all(f"model={m} method={x}" in labels for m in ("minilm", "bert-base") for x in METHOD_FILES)
    assert "model=gpt2 method=mpoe ablation=m3" in labels and "model=gpt2 method=mpoe ablation=no_sharing" in labels


@pytest.mark.parametrize("overrides,total", README_COUNTS, ids=lambda x: "-".join(x) if isinstance(x, list) else "")
def test_readme_parameter_table_row_matches_the_dry_run(overrides, total):
    assert meta_parameter_report(tuple(overrides))["total"] == total


@pytest.mark.slow
def test_upcycling_benchmark_reports_its_own_peak_not_its_parents():
    ballast = bytearray(1024**3)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # this process now peaks above 1 GB; Linux hands that to ru_maxrss of what it starts
    code = "import sys; sys.path.insert(0, 'benchmarks'); import upcycle_memory as u; print(u.peak_rss_gb())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    del ballast
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.9
