"""Hugging Face safetensors -> Megatron dist checkpoint: `megatron-rl convert hf-to-megatron`, same arguments.

    python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR                                   # one process, TP1
    torchrun --standalone --nproc_per_node 4 tools/convert_hf_to_megatron.py HF_DIR OUT_DIR --tp 2 --pp 2

megatron_rl/convert.py describes the conversion.
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
