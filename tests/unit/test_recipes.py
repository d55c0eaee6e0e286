"""configs/recipes/: each recipe validates at its stated GPU count, carries the papers' hyperparameters
(ALGORITHMS.md, one assertion per value), and `plan` lays it out on the stated GPUs within 80 GB."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from megatron_rl.config import ConfigError, dump_config, load_config
from megatron_rl.models.hf_config import model_config_from_hf
from megatron_rl.plan import GIB, format_plan, learner_memory, model_parameters, rank_layout

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "recipes"
GPUS = {"kpo_qwen3_4b": 8, "trm_qwen3_8b_base": 16, "vespo_qwen3_30b_a3b_base": 32}  # learner GPUs each states
MODELS = {"kpo_qwen3_4b": "Qwen3-4B", "trm_qwen3_8b_base": "Qwen3-8B-Base",
          "vespo_qwen3_30b_a3b_base": "Qwen3-30B-A3B-Base"}
ENGINE_TP = {"kpo_qwen3_4b": 1, "trm_qwen3_8b_base": 1, "vespo_qwen3_30b_a3b_base": 2}
GPU_MEMORY = 80 * 10**9  # the recipes are laid out for 80 GB GPUs


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' model.hf_path is relative to the repository


def recipe(name: str):
    return load_config(RECIPES / f"{name}.yaml")


def test_every_recipe_is_listed():
    assert sorted(path.stem for path in RECIPES.glob("*.yaml")) == sorted(GPUS)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_recipe_validates_at_its_gpu_count(name, tmp_path):
    cfg = recipe(name)
    assert cfg.parallel.world_size == GPUS[name]
    assert Path(cfg.model.hf_path).name == MODELS[name]
    # the resolved config is complete: the plain loader (no HF lookup) reads it back unchanged
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(cfg))
    assert load_config(resolved) == cfg


@pytest.mark.parametrize("name", sorted(GPUS))
def test_recipe_sets_no_architecture_key(name):
    """The architecture comes from model.hf_path only (moe_aux_loss_coeff is a training choice)."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert set(raw["model"]) <= {"hf_path", "moe_aux_loss_coeff"}


@pytest.mark.parametrize("name", sorted(GPUS))
def test_every_key_is_tagged(name):
    """Each key line that sets a value cites ALGORITHMS.md ([§N]) or is marked [ours], or explains itself."""
    for number, line in enumerate((RECIPES / f"{name}.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s+[a-z_]+: \S", line) and "#" not in line:
            pytest.fail(f"{name}.yaml:{number} sets a value without a comment: {line.strip()}")


def test_kpo_qwen3_4b_is_the_papers_run():
    cfg = recipe("kpo_qwen3_4b")
    algorithm, data, optimizer, sampling = cfg.algorithm, cfg.data, cfg.optimizer, cfg.rollout.sampling
    assert algorithm.loss == "kpo"
    assert algorithm.kpo.q == 1e-6  # §2.5 Q
    assert algorithm.kpo.r == 1.0  # §2.5 R
    assert algorithm.kpo.clip is True  # §2.4 KPO-clipped
    assert (algorithm.kpo.eps_low, algorithm.kpo.eps_high) == (3e-4, 4e-4)  # §2.5
    assert algorithm.loss_agg_mode == "seq-mean-token-mean"  # §2.4
    assert algorithm.advantage.estimator == "grpo"  # §2.4: std-normalized GRPO
    assert algorithm.corrections.tis is None and algorithm.corrections.trm is None  # §2.1: no rollout correction
    assert (data.rollout_batch_size, data.num_mini_batches) == (32, 4)  # §2.5: 32 prompts, 4 mini-batches
    assert cfg.rollout.n_samples_per_prompt == 8  # §2.5 G
    assert (data.max_prompt_length, data.max_response_length) == (1024, 4096)  # §2.5
    assert optimizer.lr == 1e-6  # §2.5
    assert optimizer.lr_warmup_steps == 0.05 * data.train_steps * data.num_mini_batches  # §2.5 warmup ratio 0.05
    assert optimizer.weight_decay == 0.1  # §2.5
    assert optimizer.clip_grad == 1.0  # §2.5
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, -1)  # §2.5
    assert cfg.rollout.async_mode is False  # §2.1: pi_old recomputed each step


def test_vespo_qwen3_30b_a3b_base_is_the_papers_n8_run():
    cfg = recipe("vespo_qwen3_30b_a3b_base")
    algorithm, data, optimizer, parallel = cfg.algorithm, cfg.data, cfg.optimizer, cfg.parallel
    assert algorithm.loss == "vespo"
    assert algorithm.vespo.pos == (2.0, 3.0)  # §3.3 (c1, c2) for A >= 0
    assert algorithm.vespo.neg == (3.0, 2.0)  # §3.3 (c1, c2) for A < 0
    assert algorithm.vespo.use_rollout_log_prob is False  # §3.2 sync runs: mu = pi_old
    assert algorithm.max_log_ratio == 20.0  # §3.3 clamp
    assert algorithm.loss_agg_mode == "token-mean"  # §3.2
    assert algorithm.advantage.estimator == "grpo"  # §3.2 std-normalized, as released
    assert cfg.rollout.n_samples_per_prompt == 8  # §3.3
    assert (data.max_prompt_length, data.max_response_length) == (1024, 15360)  # §3.3
    assert data.rollout_batch_size // data.num_mini_batches == 256  # §3.3 mini-batch of 256 prompts
    assert data.num_mini_batches == 8  # the staleness ratio N = 8 (§3.3, Table 1)
    assert 1500 <= data.train_steps * data.num_mini_batches < 1500 + data.num_mini_batches  # §3.3 1500 steps
    assert (optimizer.lr, optimizer.min_lr, optimizer.lr_decay_style, optimizer.lr_warmup_steps) == (
        1e-6, 1e-6, "constant", 0)  # §3.3 constant, no warmup
    assert (parallel.tp, parallel.ep, parallel.etp) == (2, 8, 1)  # §3.4
    assert cfg.model.num_experts == 128  # Qwen3-30B-A3B-Base [§3.4], from its config.json
    assert cfg.rollout.async_mode is False  # §3.2 the synchronous runs


def test_trm_qwen3_8b_base_is_the_papers_setup():
    cfg = recipe("trm_qwen3_8b_base")
    algorithm, data = cfg.algorithm, cfg.data
    assert algorithm.loss == "trm"  # §4.3
    assert algorithm.trm.max_k2 == 0.05  # §4.4 TRM-Max delta
    assert algorithm.trm.avg_k3 is None  # §4.4 TRM-Max alone
    assert algorithm.advantage.estimator == "grpo"  # §4.4
    assert cfg.rollout.n_samples_per_prompt == 16  # §4.4 group 16
    assert data.rollout_batch_size == 32  # §4.4
    assert data.num_mini_batches == 1  # §4.4 train batch = rollout batch
    assert cfg.optimizer.lr == 1e-6  # §4.4


@pytest.mark.parametrize("name", sorted(GPUS))
def test_rollout_runs_on_its_own_nodes(name):
    cfg = recipe(name)
    engines = cfg.rollout.engines
    assert all(e.kind == "sglang" and not e.launch and e.host.startswith("rollout-") for e in engines)
    assert len({(e.host, e.port) for e in engines}) == len(engines)
    assert {e.tp for e in engines} == {ENGINE_TP[name]}


@pytest.mark.parametrize("name", sorted(GPUS))
def test_plan_lays_out_the_stated_gpus(name):
    cfg = recipe(name)
    text = format_plan(cfg)
    gpus = GPUS[name]
    assert f"Learner: {gpus} GPUs on {gpus // 8} node{'s' if gpus > 8 else ''} of 8 GPUs\n" in text
    rows = [line for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+ \|", line)]
    assert [int(row.split()[0]) for row in rows] == list(range(gpus))
    assert [int(row.split()[1]) for row in rows] == [place.node for place in rank_layout(cfg.parallel)]
    (memory,) = learner_memory(cfg)  # pp 1
    assert f"Fullest GPU: stage 0, {memory.total / GIB:.1f} GiB" in text
    assert memory.total < GPU_MEMORY


def test_plan_command_on_a_recipe():
    result = subprocess.run([sys.executable, "-m", "megatron_rl.cli", "plan", "configs/recipes/kpo_qwen3_4b.yaml"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == format_plan(recipe("kpo_qwen3_4b"))


@pytest.mark.parametrize(("name", "total", "non_embedding", "active"), [
    ("kpo_qwen3_4b", 4.0, 3.6, None),  # Qwen3-4B's model card: 4.0 B, 3.6 B non-embedding
    ("trm_qwen3_8b_base", 8.2, 6.95, None),  # Qwen3-8B-Base: 8.2 B, 6.95 B non-embedding
    ("vespo_qwen3_30b_a3b_base", 30.5, 29.9, 3.3),  # Qwen3-30B-A3B-Base: 30.5 B, 3.3 B activated, 29.9 B non-emb.
])
def test_hf_configs_match_the_model_cards(name, total, non_embedding, active):
    path = RECIPES / "hf_configs" / MODELS[name]
    fields = model_config_from_hf(json.loads((path / "config.json").read_text()))
    assert model_config_from_hf(AutoConfig.from_pretrained(path)) == fields  # transformers reads the same model
    cfg = recipe(name)
    params = model_parameters(cfg.model)
    embeddings = cfg.model.vocab_size * cfg.model.hidden_size * (2 if cfg.model.untie_embeddings_and_output_weights
                                                                 else 1)
    digits = len(str(non_embedding).split(".")[1])
    assert round((params.dense + params.expert) / 1e9, 1) == total
    assert round((params.dense + params.expert - embeddings) / 1e9, digits) == non_embedding
    if active is not None:
        routed = params.expert * cfg.model.moe_router_topk / cfg.model.num_experts
        assert active <= (params.dense + routed) / 1e9 < active + 0.1  # 3.35 B: the card truncates


def test_layout_checks_see_the_real_model():
    """Negative control: layouts that only the checkpoint's architecture rules out are refused."""
    with pytest.raises(ConfigError) as error:
        load_config(RECIPES / "kpo_qwen3_4b.yaml", ["parallel.tp=1", "parallel.sequence_parallel=false",
                                                        "parallel.pp=8", "data.max_response_length=40000"])
    assert error.value.errors == [
        ("parallel.pp", "must divide model.num_layers = 36, got 8"),
        ("model.max_position_embeddings", "must be >= data.max_prompt_length + data.max_response_length = 41024, "
                                          "got 40960"),
    ]


@pytest.mark.parametrize("name", sorted(GPUS))
def test_docs_show_the_memory_plan_prints(name):
    """docs/recipes.md quotes plan's memory estimate of each recipe verbatim."""
    text = format_plan(recipe(name))
    memory = text[text.index("Learner memory per GPU"):]
    assert f"```text\n{memory}```" in (REPO / "docs" / "recipes.md").read_text()
