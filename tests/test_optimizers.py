"""Optimizers from config: the learning-rate schedule, the weight-decay mask, clipping,
Adafactor, and the validation messages."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from EasyLM.config import ConfigError
from EasyLM.optimizers import (get_default_config, get_optimizer, learning_rate_schedule,
                               weight_decay_mask)


def schedule(**updates):
    config = get_default_config({f"adamw_optimizer.{k}": v for k, v in updates.items()})
    return learning_rate_schedule(config.adamw_optimizer)


def test_warmup_then_cosine_and_linear_decay_to_end_lr():
    cosine = schedule(init_lr=0.0, lr=1.0, end_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110)
    np.testing.assert_allclose([cosine(s) for s in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(cosine(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way: cos = 0
    np.testing.assert_allclose([cosine(110), cosine(10_000)], [0.1, 0.1], atol=1e-6)
    linear = schedule(lr=1.0, end_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110,
                      lr_schedule="linear")
    np.testing.assert_allclose([linear(35), linear(60), linear(500)], [0.775, 0.55, 0.1],
                               atol=1e-6)
    constant = schedule(lr=0.3, lr_warmup_steps=4, lr_decay_steps=0)
    np.testing.assert_allclose([constant(2), constant(4), constant(10 ** 6)], [0.15, 0.3, 0.3],
                               atol=1e-6)


@pytest.mark.slow
def test_weight_decay_skips_excluded_parameters():
    params = {"transformer": {"ln_f": {"kernel": jnp.ones(4)},
                              "wte": {"embedding": jnp.ones((3, 4))}},
              "lm_head": {"kernel": jnp.ones((4, 3))}}
    mask = weight_decay_mask(r"ln_f/kernel, wte/embedding")(params)
    assert mask == {"transformer": {"ln_f": {"kernel": False}, "wte": {"embedding": False}},
                    "lm_head": {"kernel": True}}
    tx, _ = get_optimizer(get_default_config({
        "adamw_optimizer.weight_decay": 0.5, "adamw_optimizer.lr": 0.1,
        "adamw_optimizer.weight_decay_exclusions": r"ln_f/kernel,wte/embedding"}))
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["lm_head"]["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_allclose(new["transformer"]["ln_f"]["kernel"], 1.0)
    np.testing.assert_allclose(new["transformer"]["wte"]["embedding"], 1.0)


def test_global_norm_clipping_bounds_the_update():
    # A huge eps makes Adam's update proportional to the (clipped) gradient.
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 100.0)}

    def first_update(clip):
        tx, _ = get_optimizer(get_default_config({
            "adamw_optimizer.lr": 1.0, "adamw_optimizer.eps": 1e6, "adamw_optimizer.b1": 0.0,
            "adamw_optimizer.clip_gradient": clip, "adamw_optimizer.weight_decay": 0.0}))
        return tx.update(grads, tx.init(params), params)[0]["w"]

    ratio = np.asarray(first_update(1.0) / first_update(0.0))
    np.testing.assert_allclose(ratio, 1.0 / 200.0, rtol=1e-4)  # |g| = 200 clipped to 1


def test_adafactor_minimises_a_quadratic():
    tx, _ = get_optimizer(get_default_config({"type": "adafactor",
                                              "adafactor_optimizer.lr": 0.1}))
    params = {"w": jnp.full((3, 2), 3.0)}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    start = loss(params)
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 0.5 * start


@pytest.mark.parametrize("updates, key", [
    ({"type": "sgd"}, "optimizer.type"),
    ({"adamw_optimizer.lr_warmup_steps": 10, "adamw_optimizer.lr_decay_steps": 5},
     "optimizer.adamw_optimizer.lr_decay_steps"),
    ({"adamw_optimizer.lr_schedule": "step"}, "optimizer.adamw_optimizer.lr_schedule"),
    ({"accumulate_gradient_steps": 0}, "optimizer.accumulate_gradient_steps"),
    ({"adamw_optimizer.lr": -1e-3}, "optimizer.adamw_optimizer.lr"),
    ({"adamw_optimizer.lr": 0.0}, "optimizer.adamw_optimizer.lr"),
    ({"adamw_optimizer.init_lr": -1e-5}, "optimizer.adamw_optimizer.init_lr"),
    ({"adamw_optimizer.lr_decay_steps": -1}, "optimizer.adamw_optimizer.lr_decay_steps"),
    ({"adamw_optimizer.b1": 1.0}, "optimizer.adamw_optimizer.b1"),
    ({"adamw_optimizer.b2": -0.5}, "optimizer.adamw_optimizer.b2"),
    ({"adamw_optimizer.eps": -1e-8}, "optimizer.adamw_optimizer.eps"),
    ({"type": "adafactor", "adafactor_optimizer.lr": -0.01}, "optimizer.adafactor_optimizer.lr"),
    ({"type": "adafactor", "adafactor_optimizer.momentum": 1.0},
     "optimizer.adafactor_optimizer.momentum"),
    ({"type": "adafactor", "adafactor_optimizer.clipping_threshold": -1.0},
     "optimizer.adafactor_optimizer.clipping_threshold"),
])
def test_invalid_settings_name_the_key(updates, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_optimizer(get_default_config(updates))


def test_unknown_optimizer_key_suggests_close_names():
    with pytest.raises(ConfigError, match="weight_decay"):
        get_default_config({"adamw_optimizer.weight_decy": 0.1})
