"""Megatron's data-parallel wrapper, Adam optimizer and learning-rate schedule, from the config.

    model = wrap_data_parallel(build_model_chunks(cfg.model, cfg.parallel), cfg.optimizer)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, total_steps)

fp32 weights and gradients. With `use_distributed_optimizer` the Adam state and the fp32 main
parameters are sharded over the data-parallel ranks (ZeRO-1). Gradients are clipped to
`clip_grad` by global norm; the schedule warms up linearly over `lr_warmup_steps` optimizer steps,
then decays to `min_lr` over the remaining steps (`lr_decay_style`). Weight decay is constant.
"""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rl.config import OptimizerConfig


def wrap_data_parallel(chunks: list[torch.nn.Module], optim: OptimizerConfig) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk: gradients land in contiguous fp32 buffers and are
    reduced over the data-parallel x context-parallel group by finalize_model_grads."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(
    model: list[DistributedDataParallel], optim: OptimizerConfig, total_steps: int
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Adam over every chunk's parameters and its schedule over total_steps optimizer steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            use_distributed_optimizer=optim.use_distributed_optimizer,
            params_dtype=torch.float32,
        ),
        model,
    )
    warmup = min(optim.lr_warmup_steps, total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
