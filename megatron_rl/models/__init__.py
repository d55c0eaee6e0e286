"""Model families known outside Megatron-Core: Hugging Face configs, parameter names and checkpoint files.

- hf_config.py: a Hugging Face config -> the fields of our ModelConfig (model_config_from_hf).
- hf_mapping.py: Hugging Face <-> Megatron-Core parameter names, shapes and layouts, the one place that
  knows them; used by checkpoint conversion and by weight sync to rollout engines.
- hf_checkpoint.py: streaming safetensors reader and atomic sharded writer.
"""
