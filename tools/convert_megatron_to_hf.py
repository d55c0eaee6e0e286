"""Megatron dist checkpoint -> Hugging Face safetensors: `megatron-rl convert megatron-to-hf`, same arguments.

    python tools/convert_megatron_to_hf.py CKPT_DIR OUT_DIR --hf-config HF_DIR            # one process
    torchrun --standalone --nproc_per_node 2 tools/convert_megatron_to_hf.py CKPT_DIR OUT_DIR --hf-config HF_DIR --ep 2

megatron_rl/convert.py describes the conversion.
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
