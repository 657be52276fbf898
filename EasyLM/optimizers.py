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
the comma-separated regexes in ``weight_decay_exclusions`` (default: the RMSNorm scales and the
gate biases of forgetting layers, which decay would pull towards strong forgetting).
``clip_gradient > 0`` clips the global gradient norm before the update.

``trainable`` (comma-separated regexes of parameter paths, e.g. ``h/(8|16|24)/attention/``)
trains only the parameters whose path matches one of them: the others keep their values, get
no optimizer state (no moments in memory or in checkpoints) and count neither in the clipped
gradient norm nor in weight decay.  Empty (the default): every parameter trains.  A run whose
patterns match no parameter is refused before it starts (:func:`trainable_counts`).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from EasyLM.config import ConfigDict, ConfigError, Option, check_ranges
from EasyLM.jax_utils import tree_path_name

OPTIMIZER_TYPES = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear")


def _schedule_defaults():
    return dict(
        init_lr=Option(0.0, "learning rate at step 0, raised linearly to lr during warmup"),
        lr=Option(1e-4, "peak learning rate, reached after lr_warmup_steps"),
        end_lr=Option(1e-5, "learning rate at lr_decay_steps and after"),
        lr_warmup_steps=Option(0, "steps of linear warmup from init_lr to lr"),
        lr_decay_steps=Option(0, "step (counted from 0, warmup included) where the decay to "
                              "end_lr ends; 0 keeps lr after warmup"),
        lr_schedule=Option("cosine", "decay shape: cosine or linear"),
        weight_decay=Option(0.0, "decoupled weight decay per step, times the learning rate"),
        weight_decay_exclusions=Option(r"(attention_norm|ffn_norm|ln_f|q_norm|k_norm|o_norm)"
                                       r"/kernel,(fgate|kshift|vshift|gate_up)/bias",
                                       "comma-separated regexes of parameter paths without "
                                       "weight decay (default: the RMSNorm scales and the "
                                       "forgetting and GLA layers' gate biases)"),
        clip_gradient=Option(1.0, "clip the global gradient norm to this; 0 = no clipping"),
    )


def get_default_config(updates=None):
    config = ConfigDict(
        type=Option("adamw", "adamw or adafactor; only that optimizer's group is used"),
        trainable=Option("", "comma-separated regexes of the parameter paths that train (e.g. "
                         "'h/(8|16|24)/attention/'); the others stay as loaded and get no "
                         "optimizer state; empty: all train"),
        accumulate_gradient_steps=Option(1, "micro-batches per optimizer update; each is "
                                         "batch_size / this many rows (less memory, same "
                                         "update)"),
        adamw_optimizer=dict(
            _schedule_defaults(),
            b1=Option(0.9, "Adam decay of the first moment"),
            b2=Option(0.95, "Adam decay of the second moment"),
            eps=Option(1e-8, "Adam epsilon added to the root of the second moment"),
            bf16_momentum=Option(False, "keep the first moment in bfloat16 (less memory)")),
        adafactor_optimizer=dict(
            _schedule_defaults(),
            decay_rate=Option(0.8, "second-moment decay exponent: its decay is 1 - step^-this"),
            momentum=Option(0.0, "first-moment decay; 0 keeps no first moment"),
            multiply_by_parameter_scale=Option(False, "scale updates by the parameters' root "
                                               "mean square"),
            clipping_threshold=Option(1.0, "clip each update's root mean square to this; 0 = "
                                      "off"),
            min_dim_size_to_factor=Option(128, "factor the second moment only of parameters "
                                          "whose two largest dimensions are at least this")),
    )
    return config.copy_and_update(updates)


def validate(config, prefix="optimizer."):
    """Raise ``ConfigError`` naming the key for settings that cannot work."""
    if config.type not in OPTIMIZER_TYPES:
        raise ConfigError(f"{prefix}type={config.type!r}: choose one of {OPTIMIZER_TYPES}")
    check_ranges(config, prefix, accumulate_gradient_steps=">= 1")
    sub = f"{prefix}{config.type}_optimizer."
    opt = config[f"{config.type}_optimizer"]
    if opt.lr_schedule not in SCHEDULES:
        raise ConfigError(f"{sub}lr_schedule={opt.lr_schedule!r}: choose one of {SCHEDULES}")
    # A negative rate anywhere in the schedule is gradient ascent.
    check_ranges(opt, sub, init_lr=">= 0", lr="> 0", end_lr=">= 0", lr_warmup_steps=">= 0",
                 lr_decay_steps=">= 0", weight_decay=">= 0", clip_gradient=">= 0")
    if config.type == "adamw":
        check_ranges(opt, sub, b1=(">= 0", "< 1"), b2=(">= 0", "< 1"), eps=">= 0")
    else:
        check_ranges(opt, sub, decay_rate=">= 0", momentum=(">= 0", "< 1"),
                     clipping_threshold=">= 0", min_dim_size_to_factor=">= 0")
    if 0 < opt.lr_decay_steps <= opt.lr_warmup_steps:
        raise ConfigError(f"{sub}lr_decay_steps={opt.lr_decay_steps} must exceed "
                          f"{sub}lr_warmup_steps={opt.lr_warmup_steps} (it counts from step 0, "
                          f"warmup included), or be 0 for no decay")
    for key, text in ((f"{sub}weight_decay_exclusions", opt.weight_decay_exclusions),
                      (f"{prefix}trainable", config.trainable)):
        for pattern in _patterns(text):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{key}: bad regex {pattern!r}: {e}")


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


def _patterns(text):
    return [p.strip() for p in str(text or "").split(",") if p.strip()]


def _path_matcher(text):
    """``params -> tree of bool``: True where a parameter's path matches a regex of ``text``
    (comma-separated)."""
    patterns = [re.compile(p) for p in _patterns(text)]

    def matches(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(p.search(tree_path_name(path)) for p in patterns), params)

    return matches


def weight_decay_mask(exclusions):
    """``params -> tree of bool``: True where weight decay applies."""
    excluded = _path_matcher(exclusions)
    return lambda params: jax.tree_util.tree_map(lambda x: not x, excluded(params))


def trainable_counts(config, params):
    """``(trainable, total)`` parameter counts of ``params`` (arrays or shapes) under
    ``optimizer.trainable``; ``ConfigError`` naming the key when its patterns match none."""
    sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)),
                                                             params))
    total = sum(sizes)
    if not _patterns(config.trainable):
        return total, total
    flags = jax.tree_util.tree_leaves(_path_matcher(config.trainable)(params))
    trained = sum(size for size, flag in zip(sizes, flags) if flag)
    if trained == 0:
        names = [tree_path_name(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0][:3]]
        raise ConfigError(f"optimizer.trainable={config.trainable!r} matches no parameter; "
                          f"paths look like {', '.join(names)}")
    return trained, total


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
    if _patterns(config.trainable):
        trained = _path_matcher(config.trainable)
        core = optax.multi_transform(
            {"train": core, "frozen": optax.set_to_zero()},
            lambda params: jax.tree_util.tree_map(lambda t: "train" if t else "frozen",
                                                  trained(params)))
    return core, schedule
