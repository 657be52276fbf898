"""Optax optimizers from config: AdamW (default) or Adafactor, with a warmup-then-decay schedule.

Config keys (``optimizer.*``) keep the names of EasyLM / the original LongLLaMA FoT code, so
``optimizer.adamw_optimizer.lr`` and friends from old configs work unchanged.

Learning-rate schedule, shared by both optimizers (``step`` = optimizer updates done so far)::

    step <  lr_warmup_steps:  init_lr + (lr - init_lr) * step / lr_warmup_steps
    afterwards:               lr -> end_lr over p = (step - warmup) / (lr_decay_steps - warmup),
                              linear: lr + (end_lr - lr) * p,
                              cosine: end_lr + (lr - end_lr) * (1 + cos(pi * p)) / 2,
                              then constant end_lr once p >= 1

``lr_decay_steps`` counts from step 0 (warmup included), as in EasyLM; 0 keeps ``lr`` constant
after warmup.  Weight decay is decoupled (AdamW) and skips parameters whose path matches one of
the comma-separated regexes in ``weight_decay_exclusions`` (default: the RMSNorm scales).
``clip_gradient > 0`` clips the global gradient norm before the update.
"""
import re

import jax
import jax.numpy as jnp
import optax

from EasyLM.config import ConfigDict, ConfigError
from EasyLM.jax_utils import tree_path_name

OPTIMIZER_TYPES = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear")


def _schedule_defaults():
    return dict(init_lr=0.0, lr=1e-4, end_lr=1e-5, lr_warmup_steps=0, lr_decay_steps=0,
                lr_schedule="cosine", weight_decay=0.0,
                weight_decay_exclusions=r"(attention_norm|ffn_norm|ln_f)/kernel",
                clip_gradient=1.0)


def get_default_config(updates=None):
    config = ConfigDict(
        type="adamw",
        # Micro-batches per optimizer update; each is batch_size / this many rows.
        accumulate_gradient_steps=1,
        adamw_optimizer=dict(_schedule_defaults(), b1=0.9, b2=0.95, eps=1e-8,
                             bf16_momentum=False),
        adafactor_optimizer=dict(_schedule_defaults(), decay_rate=0.8, momentum=0.0,
                                 multiply_by_parameter_scale=False, clipping_threshold=1.0,
                                 min_dim_size_to_factor=128),
    )
    return config.copy_and_update(updates)


def validate(config, prefix="optimizer."):
    """Raise ``ConfigError`` naming the key for settings that cannot work."""
    if config.type not in OPTIMIZER_TYPES:
        raise ConfigError(f"{prefix}type={config.type!r}: choose one of {OPTIMIZER_TYPES}")
    if config.accumulate_gradient_steps < 1:
        raise ConfigError(f"{prefix}accumulate_gradient_steps must be >= 1, got "
                          f"{config.accumulate_gradient_steps}")
    sub = f"{prefix}{config.type}_optimizer."
    opt = config[f"{config.type}_optimizer"]
    if opt.lr_schedule not in SCHEDULES:
        raise ConfigError(f"{sub}lr_schedule={opt.lr_schedule!r}: choose one of {SCHEDULES}")
    if opt.lr_warmup_steps < 0 or opt.lr_decay_steps < 0:
        raise ConfigError(f"{sub}lr_warmup_steps and {sub}lr_decay_steps must be >= 0")
    if 0 < opt.lr_decay_steps <= opt.lr_warmup_steps:
        raise ConfigError(f"{sub}lr_decay_steps={opt.lr_decay_steps} must exceed "
                          f"{sub}lr_warmup_steps={opt.lr_warmup_steps} (it counts from step 0, "
                          f"warmup included), or be 0 for no decay")
    for pattern in _exclusions(opt.weight_decay_exclusions):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{sub}weight_decay_exclusions: bad regex {pattern!r}: {e}")


def learning_rate_schedule(opt):
    """The schedule of one ``*_optimizer`` group as a jax function of the step."""
    init_lr, peak, end = float(opt.init_lr), float(opt.lr), float(opt.end_lr)
    warmup, decay_end, kind = int(opt.lr_warmup_steps), int(opt.lr_decay_steps), opt.lr_schedule

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = init_lr + (peak - init_lr) * step / max(warmup, 1)
        if decay_end == 0:
            after = jnp.full_like(step, peak)
        else:
            progress = jnp.clip((step - warmup) / (decay_end - warmup), 0.0, 1.0)
            if kind == "linear":
                after = peak + (end - peak) * progress
            else:
                after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, after)

    return schedule


def _exclusions(text):
    return [p.strip() for p in str(text or "").split(",") if p.strip()]


def weight_decay_mask(exclusions):
    """``params -> tree of bool``: True where weight decay applies."""
    patterns = [re.compile(p) for p in _exclusions(exclusions)]

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(p.search(tree_path_name(path)) for p in patterns), params)

    return mask


def get_optimizer(config):
    """``(optax transformation, learning-rate schedule)`` for an ``optimizer`` config group."""
    validate(config)
    opt = config[f"{config.type}_optimizer"]
    schedule = learning_rate_schedule(opt)
    mask = weight_decay_mask(opt.weight_decay_exclusions)
    if config.type == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=mask,
                           mu_dtype=jnp.bfloat16 if opt.bf16_momentum else None)
    else:
        core = optax.adafactor(
            schedule, min_dim_size_to_factor=opt.min_dim_size_to_factor,
            decay_rate=opt.decay_rate, multiply_by_parameter_scale=opt.multiply_by_parameter_scale,
            clipping_threshold=opt.clipping_threshold or None, momentum=opt.momentum or None,
            weight_decay_rate=opt.weight_decay or None, weight_decay_mask=mask)
    if opt.clip_gradient > 0:
        core = optax.chain(optax.clip_by_global_norm(opt.clip_gradient), core)
    return core, schedule
