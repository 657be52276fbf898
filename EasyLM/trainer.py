"""Train and eval steps under ``jax.jit`` with explicit shardings, gradient accumulation, and
the training loop, a plain step loop under the hooks of :mod:`EasyLM.hooks` (logging,
evaluation, checkpoints, throughput from :mod:`EasyLM.flops`).

The train state is a plain dict ``{"step", "params", "opt_state", "skipped_steps"}``: float32
master parameters (the Flax variables' ``params`` tree), the optax state, the number of updates
done and the number of non-finite updates skipped.  The model computes in ``dtype`` (e.g. bf16)
and casts the float32 parameters on use.

Loss and accuracy are means over the target tokens whose ``loss_mask > 0`` (FOT_SPEC 4).  With
``accumulate_gradient_steps = n`` the global batch is cut into ``n`` consecutive micro-batches of
``B / n`` rows (whole groups of ``dataset_packing`` rows, so cross-batch attention sees the same
neighbours as the data pipeline laid out); per-token losses are summed and divided by the token
count of the whole batch, so the update equals the one of a single step over the full batch.
"""
import dataclasses
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as PS

from EasyLM.flops import flops_per_step, peak_flops_per_device
from EasyLM.jax_utils import (BATCH_AXES, float_dtype, match_partition_rules, named_shardings,
                              with_sharding_constraint)
from EasyLM.hooks import (Evaluation, LogRecords, ProfileSteps, SaveCheckpoints, StepInfo,
                          TrainMetrics)
from EasyLM.logging_utils import ConsoleProgress
from EasyLM.losses import DEFAULT_LOSS_CHUNK_TOKENS, chunked_token_sums, token_sums
from EasyLM.models.llama.llama_model import (FlaxLLaMAForCausalLMModule, get_partition_rules,
                                             output_head_kernel)
from EasyLM.optimizers import get_optimizer, trainable_counts
from FoT.batch import Batch


def state_partition_specs(state_shapes):
    """PartitionSpecs for the whole train state: the parameter rules match optimizer moments by
    their path too; statistics of another rank (Adafactor's factored moments) are replicated."""
    specs = match_partition_rules(get_partition_rules(), state_shapes)
    return jax.tree_util.tree_map(
        lambda spec, leaf: spec if len(spec) <= np.ndim(leaf) else PS(), specs, state_shapes,
        is_leaf=lambda x: isinstance(x, PS))


def data_split(mesh):
    """``(index, count)``: which consecutive block of batch rows this process feeds.

    Rows are sharded over the mesh axes of the logical ``batch`` axis (``BATCH_AXES``);
    processes whose devices hold the same rows (e.g. model-parallel peers) feed the same
    block.
    """
    shards = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    sharding = NamedSharding(mesh, PS(BATCH_AXES))
    held = sorted({idx[0].indices(shards)[:2]
                   for idx in sharding.addressable_devices_indices_map((shards,)).values()})
    start, stop = held[0][0], held[-1][1]
    rows = stop - start
    if sum(b - a for a, b in held) != rows or shards % rows or start % rows:
        raise ValueError(f"process {jax.process_index()} holds batch rows {held} of {shards} "
                         f"row shards, not one aligned block; use a mesh whose dp/fsdp axes "
                         f"follow the process order")
    return start // rows, shards // rows


class Trainer:
    """Jitted, sharded train/eval steps for a LLaMA model and its eval twin (same parameters,
    own cross-batch settings)."""

    def __init__(self, mesh, model_config, optimizer_config, dtype="fp32",
                 eval_model_config=None, skip_nonfinite=False,
                 loss_chunk_tokens=DEFAULT_LOSS_CHUNK_TOKENS, z_loss=0.0):
        """``loss_chunk_tokens > 0``: the loss runs over slices of sequence positions holding
        at most that many tokens of the global batch, never materialising the whole
        ``[B, L, V]`` logits (:func:`EasyLM.losses.chunked_token_sums`); 0 computes full
        logits.  ``z_loss > 0`` adds that coefficient times the mean ``logsumexp(logits)^2``
        of the counted tokens to the objective; the step's metrics then hold it apart
        (``z_loss``, the term as added) and ``loss`` stays the cross-entropy."""
        self.mesh = mesh
        self.model_config = model_config
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        self.z_loss = float(z_loss)
        compute = float_dtype(dtype)
        self.compute_dtype = compute
        self.model = FlaxLLaMAForCausalLMModule(model_config, dtype=compute,
                                                param_dtype=jnp.float32)
        self.eval_model = FlaxLLaMAForCausalLMModule(eval_model_config or model_config,
                                                     dtype=compute, param_dtype=jnp.float32)
        # Parameters do not depend on the attention variant; initialising through plain XLA
        # attention keeps kernels (and their shape limits) out of the one-row init call.
        self._init_model = FlaxLLaMAForCausalLMModule(
            model_config.replace(cross_batch_range=0, attention_implementation="xla"),
            dtype=jnp.float32, param_dtype=jnp.float32)
        self.tx, self.schedule = get_optimizer(optimizer_config)
        self.accumulate = int(optimizer_config.accumulate_gradient_steps)
        self.skip_nonfinite = skip_nonfinite
        self.state_shapes = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        # (trainable, total) parameters; refuses optimizer.trainable patterns matching none.
        self.trainable_counts = trainable_counts(optimizer_config, self.state_shapes["params"])
        self.state_shardings = named_shardings(mesh, state_partition_specs(self.state_shapes))
        self.params_shardings = {"params": self.state_shardings["params"]}
        self.batch_sharding = NamedSharding(mesh, PS(BATCH_AXES))
        replicated = NamedSharding(mesh, PS())
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._from_params = jax.jit(
            self._state_from_params, in_shardings=(self.state_shardings["params"],),
            out_shardings=self.state_shardings, donate_argnums=0)
        self._train = jax.jit(self._train_step,
                              in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._eval = jax.jit(self._eval_step,
                             in_shardings=(self.state_shardings["params"], self.batch_sharding),
                             out_shardings=replicated)

    # Pure functions (traced under jit).

    def _init_state(self, rng):
        rows = self.model_config.dataset_packing
        variables = self._init_model.init(rng, jnp.zeros((rows, 1), jnp.int32))
        return self._state_from_params(variables["params"])

    def _state_from_params(self, params):
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.tx.init(params), "skipped_steps": jnp.zeros((), jnp.int32)}

    def _token_sums(self, model, params, batch):
        if self.loss_chunk_tokens <= 0:
            logits = model.apply({"params": params}, batch.input_tokens).logits
            return token_sums(logits, batch.target_tokens, batch.loss_masks)
        hidden = model.apply({"params": params}, batch.input_tokens,
                             compute_logits=False).hidden_states
        return chunked_token_sums(hidden, output_head_kernel(params, model.config),
                                  batch.target_tokens, batch.loss_masks,
                                  self.loss_chunk_tokens, self.compute_dtype)

    def _gradients(self, params, batch, token_count):
        def loss_fn(params):
            sums = self._token_sums(self.model, params, batch)
            objective = sums.loss + self.z_loss * sums.z if self.z_loss else sums.loss
            return objective / token_count, (sums.loss, sums.correct, sums.z)
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (grads,) + sums

    def _train_step(self, state, batch):
        params = state["params"]
        token_count = jnp.maximum(jnp.sum(batch.loss_masks > 0), 1).astype(jnp.float32)
        if self.accumulate == 1:
            grads, loss_sum, correct, z_sum = self._gradients(params, batch, token_count)
        else:
            n = self.accumulate
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
            micro = with_sharding_constraint(micro, PS(None, BATCH_AXES))

            def accumulate(total, micro_batch):
                part = self._gradients(params, micro_batch, token_count)
                return jax.tree_util.tree_map(jnp.add, total, part), None

            zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),) + (jnp.zeros(()),) * 3
            (grads, loss_sum, correct, z_sum), _ = jax.lax.scan(accumulate, zeros, micro)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.global_norm(grads)
        skipped = state["skipped_steps"]
        if self.skip_nonfinite:
            finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
            keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_params = jax.tree_util.tree_map(keep_old, new_params, params)
            opt_state = jax.tree_util.tree_map(keep_old, opt_state, state["opt_state"])
            skipped = skipped + (1 - finite.astype(jnp.int32))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                     "skipped_steps": skipped}
        metrics = {"loss": loss_sum / token_count, "accuracy": correct / token_count,
                   "learning_rate": self.schedule(state["step"]), "gradient_norm": grad_norm,
                   "param_norm": optax.global_norm(new_params), "skipped_steps": skipped}
        if self.z_loss:
            metrics["z_loss"] = self.z_loss * z_sum / token_count
        return new_state, metrics

    def _eval_step(self, params, batch):
        sums = self._token_sums(self.eval_model, params, batch)
        return {"loss_sum": sums.loss, "correct": sums.correct, "count": sums.count}

    # Host-side API; call these inside ``jax.set_mesh(trainer.mesh)``.

    def init_state(self, seed):
        return self._init(jax.random.PRNGKey(seed))

    def state_from_params(self, variables):
        return self._from_params(variables["params"])

    def abstract_state(self):
        return jax.tree_util.tree_map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            self.state_shapes, self.state_shardings)

    def global_batch(self, local_batch, global_rows):
        """This process's rows (a :class:`FoT.batch.Batch`, or a mapping of its fields) -> a
        Batch of global arrays sharded over the batch axes, the steps' input."""
        def global_array(local):
            local = np.asarray(local)
            return jax.make_array_from_process_local_data(
                self.batch_sharding, local, (global_rows,) + local.shape[1:])
        return jax.tree_util.tree_map(global_array, Batch.from_mapping(local_batch))

    def train_step(self, state, batch):
        return self._train(state, batch)

    def eval_step(self, params, batch):
        return self._eval(params, batch)


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    log_freq: int = 50
    eval_freq: int = 0
    eval_steps: int = 0
    save_model_freq: int = 0
    save_milestone_freq: int = 0
    peak_flops_per_device: Optional[float] = None
    # A tqdm bar, shown only when stderr is a terminal; the per-step lines are always logged.
    show_progress: bool = True
    # (first, last): a jax.profiler trace of the steps after ``first`` up to ``last``, written
    # to ``profile_dir`` (:class:`EasyLM.hooks.ProfileSteps`).
    profile_steps: Optional[Tuple[int, int]] = None
    profile_dir: str = ""


def fit(trainer, state, train_data, settings, logger, eval_data=None, checkpointing=None,
        stop=None, hooks=()):
    """Train from ``state`` (whose step is where to start) to ``settings.total_steps``; returns
    the last state.

    The hooks of :mod:`EasyLM.hooks`, registered with the frequencies of ``settings``, do the
    rest: train metrics are logged at every ``log_freq``-th step and at every evaluation,
    checkpoint and the last step; evaluation runs at step 0 of a fresh run and every
    ``eval_freq`` steps; ``checkpointing`` (:class:`EasyLM.hooks.Checkpointing`) saves after
    the step's record is logged, so a checkpoint at step S has every record up to S written.
    ``profile_steps`` traces a range of steps into ``profile_dir``.
    ``hooks``: more :class:`EasyLM.hooks.Hook`s, run after evaluation and before the record is
    written (what they put in ``info.record`` is logged at that step).

    Each record goes to ``logger.write(step, record)`` and, as one readable line, to the
    ``EasyLM`` logger (:class:`EasyLM.logging_utils.ConsoleProgress`), which ends with a
    summary naming the files of ``logger.outputs()`` when the logger has that method.

    ``stop``: called after each step before the last, on every process, it says whether to
    stop there (the same on every process: :meth:`EasyLM.run.StopSignals.requested`); the loop
    then logs that step and returns without the summary, leaving the caller to save.
    """
    s = settings
    start = int(jax.device_get(state["step"]))
    train_metrics = TrainMetrics(
        s.log_freq, flops_per_step(trainer.model_config, train_data.batch_size,
                                   train_data.seq_length),
        s.peak_flops_per_device or peak_flops_per_device(),
        train_data.batch_size * train_data.seq_length)
    registered = [train_metrics]
    if eval_data is not None and s.eval_steps > 0 and s.eval_freq > 0:
        registered.append(Evaluation(trainer, eval_data, s.eval_freq, s.eval_steps))
    registered += list(hooks)
    with ConsoleProgress(start, s.total_steps, s.show_progress) as console:
        registered.append(LogRecords(logger, console, train_metrics))
        if checkpointing is not None:
            registered.append(SaveCheckpoints(checkpointing, train_data, s.save_model_freq,
                                              s.save_milestone_freq))
        if s.profile_steps is not None:
            # Last: it starts tracing after the step's saving and ends first, so the run's
            # summary names the trace.
            registered.append(ProfileSteps(s.profile_dir, *s.profile_steps))
        return run_loop(trainer, state, train_data, s.total_steps, registered, stop)


def run_loop(trainer, state, train_data, total_steps, hooks, stop=None):
    """The step loop under the hooks (:mod:`EasyLM.hooks`): train steps from ``state`` to
    ``total_steps`` on ``train_data``'s batches, or until ``stop()`` says so; returns the
    last state."""
    info = StepInfo(step=int(jax.device_get(state["step"])), total_steps=total_steps,
                    state=state)
    for hook in hooks:
        hook.start(info)
    iterator = iter(train_data)
    while info.step < total_steps and not info.stopping:
        began = time.perf_counter()
        local_batch, data_metrics = next(iterator)
        data_wait = time.perf_counter() - began
        state, metrics = trainer.train_step(
            state, trainer.global_batch(local_batch, train_data.batch_size))
        step = info.step + 1
        info = StepInfo(step=step, total_steps=total_steps, state=state, metrics=metrics,
                        data_metrics=data_metrics, began=began, data_wait=data_wait,
                        stopping=stop is not None and step < total_steps and stop())
        due = [hook for hook in hooks if hook.due(info)]
        info.pausing = any(hook.pauses_training for hook in due)
        for hook in due:
            hook(info)
    for hook in reversed(hooks):
        hook.end(info)
    return info.state
