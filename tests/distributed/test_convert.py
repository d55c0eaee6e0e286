"""megatron-rl convert: Hugging Face safetensors <-> Megatron dist checkpoints, on one rank and on two.

Tiny random Llama (tied embeddings), Qwen3 (q/k norms, head_dim 24 != hidden / heads, untied, saved in
bf16), Qwen3-MoE (4 experts, top 2) and Qwen2-MoE (q/k/v biases, a gated shared expert, softmax before
the top k) from transformers configs (convert_worker.write_hf_models; the learner is fp32). Two torchrun
launches run the real command (see convert_worker.py): one rank converts each model at TP1; two ranks
convert Llama at TP2 and at PP2, Qwen3 at TP2, Qwen3-MoE at EP2 and Qwen2-MoE at TP2 x expert-TP2, and
convert back to HF at that layout both that checkpoint and the TP1 one.

- HF -> Megatron: loaded at its layout, the checkpoint scores tokens like transformers (fp32) within 1e-5;
  it is step 0 with an empty RL state, and records its layout.
- Megatron -> HF: every tensor is bitwise the original's (names, dtype, shape, values: the bf16 model is
  written in bf16, its config's dtype); config.json, the generation config and the tokenizer file are
  copied; transformers loads it and scores bitwise like the original.
- Refusals, run in this process (they come before any process group): an output directory that exists,
  a layout that does not divide the model (or the job), an HF config of another model, no such checkpoint;
  each named, with nothing written.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun_workers import run_worker

sys.path.insert(0, str(Path(__file__).parent))
from convert_worker import LAYOUTS, MODELS, TOKENIZER_FILE, write_hf_models  # noqa: E402

from megatron_rl.cli import main as cli  # noqa: E402

WORKER = Path(__file__).with_name("convert_worker.py")
TOOLS = Path(__file__).parents[2] / "tools"
LOGIT_TOLERANCE = 1e-5
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")
CONVERSIONS = {"one_rank": len(MODELS), "two_ranks": 3 * len(LAYOUTS)}  # launch: conversions it runs
RECORDED = {"tp1": (1, 1, 1, 1, 1), "tp2": (2, 2, 1, 1, 1), "pp2": (2, 1, 2, 1, 1), "ep2": (2, 1, 1, 2, 1),
            "etp2": (2, 2, 1, 1, 2)}  # layout: world_size, tp, pp, ep, etp


def torchrun(nproc: int, work_dir: Path, launch: str) -> str:
    return run_worker(WORKER, nproc, str(work_dir), launch)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("convert")
    write_hf_models(work_dir)
    return work_dir


@pytest.fixture(scope="module")
def runs(work_dir):
    stdout = {"one_rank": torchrun(1, work_dir, "one_rank"), "two_ranks": torchrun(2, work_dir, "two_ranks")}
    results = {launch: json.loads((work_dir / f"{launch}.json").read_text()) for launch in stdout}
    for result in results.values():
        assert "error" not in result, result["error"]
    return {name: value for result in results.values() for name, value in result.items()}, stdout


@pytest.mark.distributed
def test_megatron_checkpoints_score_like_transformers(runs):
    results, _ = runs
    for model, layout in [(model, "tp1") for model in MODELS] + LAYOUTS:
        got = results[f"{layout}_{model}"]
        print(f"{model} at {layout}: max |logit diff| = {got['logit_diff']:.2e}")
        assert got["logit_diff"] <= LOGIT_TOLERANCE, (model, layout)
        assert got["rl_state"] == {"step": 0}, (model, layout)
        recorded = got["recorded_layout"]
        assert tuple(recorded[key] for key in ("world_size", "tp", "pp", "ep", "etp")) == RECORDED[layout]


@pytest.mark.distributed
@pytest.mark.parametrize("from_tp1", [False, True])
@pytest.mark.parametrize("model, layout", LAYOUTS)
def test_round_trip_is_bitwise_and_loads_in_transformers(runs, model, layout, from_tp1):
    results, _ = runs
    got = results[f"hf_out/{'tp1' if from_tp1 else layout}_{model}_at_{layout}"]
    assert got["unequal"] == [] and got["same_names"] and got["tensors"] > 0
    assert got["same_other_files"] and got["transformers_equal"]
    expected_files = {"config.json", "generation_config.json", "model.safetensors"}
    assert set(got["files"]) == expected_files | ({TOKENIZER_FILE} if model == "qwen3" else set())


@pytest.mark.distributed
def test_outputs_replace_and_leave_nothing_behind(runs, work_dir):
    results, _ = runs
    assert "stale" not in {path.name for path in (work_dir / "megatron" / "tp1_llama").iterdir()}
    assert results["tp1_llama"]["logit_diff"] <= LOGIT_TOLERANCE  # the --overwrite conversion
    megatron = sorted(path.name for path in (work_dir / "megatron").iterdir())
    assert megatron == sorted([f"tp1_{model}" for model in MODELS] + [f"{layout}_{model}" for model, layout in LAYOUTS])
    assert sorted(path.name for path in (work_dir / "hf_out").iterdir()) == sorted(
        f"{source}_{model}_at_{layout}" for model, layout in LAYOUTS for source in (layout, "tp1"))


@pytest.mark.distributed
def test_rank_zero_reports_progress_over_the_tensors(runs):
    """Not a terminal: plain lines, the last one n/n per conversion, printed by rank 0 only."""
    _, stdout = runs
    for launch, conversions in CONVERSIONS.items():
        finished = re.findall(r"^(\d+)/\1 (?:Megatron tensors read|HF tensors written) \(", stdout[launch], re.M)
        assert len(finished) == conversions, stdout[launch][-2000:]
        assert len(re.findall(r"^wrote ", stdout[launch], re.M)) == conversions


# --- refusals, in this process ---------------------------------------------------------------------------


@pytest.fixture
def one_process(monkeypatch):
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield monkeypatch
    assert not dist.is_initialized()  # refused before any process group


def refused(capsys, *args: str) -> str:
    assert cli(["convert", *map(str, args)]) == 2
    return capsys.readouterr().err


def test_an_existing_output_is_refused(work_dir, tmp_path, capsys, one_process):
    (tmp_path / "keep").write_text("mine")
    message = refused(capsys, "hf-to-megatron", work_dir / "hf" / "qwen3", tmp_path)
    assert message == (f"convert hf-to-megatron: {tmp_path} already exists; choose a new directory or pass "
                       f"--overwrite to replace it\n")
    assert [path.name for path in tmp_path.iterdir()] == ["keep"]


@pytest.mark.parametrize("model, flags, world_size, errors", [
    ("qwen3", ["--tp", "2"], 1, ["parallel.world_size: must be a multiple of tp * pp * cp = 2, got 1"]),
    ("qwen3", ["--tp", "3"], 3, ["parallel.tp: must divide model.num_attention_heads = 4, got 3",
                                 "parallel.tp: must be a multiple or a divisor of model.num_query_groups = 2, got 3"]),
    ("qwen3", ["--pp", "4"], 4, ["parallel.pp: must divide model.num_layers = 2, got 4"]),
    ("qwen3", ["--ep", "2"], 2, ["parallel.ep: must be 1 for a dense model (model.num_experts is null), got 2"]),
    ("qwen3_moe", ["--ep", "3"], 3, ["parallel.ep: must divide model.num_experts = 4, got 3"]),
])
def test_a_layout_that_does_not_divide_the_model_is_refused(work_dir, tmp_path, capsys, one_process, model, flags,
                                                           world_size, errors):
    if world_size > 1:  # what torchrun would have set
        for variable, value in {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
            one_process.setenv(variable, value)
    out = tmp_path / "out"
    message = refused(capsys, "hf-to-megatron", work_dir / "hf" / model, out, *flags)
    assert message == "convert hf-to-megatron: " + "\n".join(errors) + "\n"
    assert list(tmp_path.iterdir()) == []


def test_another_model_or_no_checkpoint_is_refused(runs, work_dir, tmp_path, capsys, one_process):
    checkpoint, out = work_dir / "megatron" / "tp1_qwen3", tmp_path / "out"
    config = json.loads((work_dir / "hf" / "qwen3" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3, "rms_norm_eps": 1e-5}))
    message = refused(capsys, "megatron-to-hf", checkpoint, out, "--hf-config", tmp_path / "config.json")
    assert message == (f"convert megatron-to-hf: {tmp_path / 'config.json'} describes another model than the "
                       f"checkpoint {checkpoint / 'iter_0000000'}: model.num_layers (checkpoint 2, HF config 3); "
                       f"model.norm_epsilon (checkpoint 1e-06, HF config 1e-05)\n")
    message = refused(capsys, "megatron-to-hf", checkpoint, out, "--hf-config", work_dir / "hf" / "llama")
    assert "model.kv_channels (checkpoint 24, HF config 16)" in message
    assert "model.qk_layernorm (checkpoint True, HF config False)" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
    message = refused(capsys, "megatron-to-hf", tmp_path / "absent", out, "--hf-config", work_dir / "hf" / "qwen3")
    assert message == f"convert megatron-to-hf: checkpoint directory {tmp_path / 'absent'} does not exist\n"
    message = refused(capsys, "megatron-to-hf", checkpoint, out, "--hf-config", work_dir / "hf" / "qwen3",
                      "--step", "5")
    assert message == f"convert megatron-to-hf: no checkpoint for step 5 in {checkpoint} (checkpoints on disk: [0])\n"


def test_unsupported_hf_configs_are_refused_by_name(work_dir, tmp_path, capsys, one_process):
    config = json.loads((work_dir / "hf" / "qwen3" / "config.json").read_text())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    message = refused(capsys, "hf-to-megatron", tmp_path / "hf", tmp_path / "out")
    assert "HF config field 'hidden_act' = 'gelu' is not supported" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool, direction", [("convert_hf_to_megatron.py", "hf-to-megatron"),
                                             ("convert_megatron_to_hf.py", "megatron-to-hf")])
def test_the_tools_are_the_command(tool, direction):
    proc = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: megatron-rl convert {direction} "), proc.stderr
