"""Trainer library: masked loss, the same run on 1 and 8 devices, exact gradient accumulation,
skipped non-finite steps, FLOP accounting, the console (lines, bar, summary)."""
import io
import json
import logging
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from EasyLM import logging_utils
from EasyLM.data import DatasetFactory
from EasyLM.flops import flops_per_step
from EasyLM.jax_utils import MESH_AXES, get_jax_mesh, tree_path_name
from EasyLM.models.llama.llama_model import with_cross_batch
from EasyLM.optimizers import get_default_config as optimizer_config
from EasyLM.tokenizer import get_default_config as tokenizer_config
from EasyLM.tokenizer import load_tokenizer
from EasyLM.losses import token_sums
from EasyLM.trainer import LoopSettings, Trainer, data_split, fit
from FoT.batch import Batch
from FoT.cross_batch import allowed_slots

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZER = optimizer_config({"adamw_optimizer.lr": 3e-3, "adamw_optimizer.lr_warmup_steps": 2,
                              "adamw_optimizer.weight_decay": 0.05})


def dataset(pipeline, batch_size=8, seq_length=32, path="data/tiny_corpus.jsonl"):
    tokenizer = load_tokenizer(tokenizer_config({"vocab_file": f"{REPO}/tokenizers/tiny_sp.model"}))
    config = DatasetFactory.get_default_config({
        "type": "json", "json_dataset.path": f"{REPO}/{path}",
        "json_dataset.data_pipeline": pipeline, "json_dataset.batch_size": batch_size,
        "json_dataset.seq_length": seq_length})
    return DatasetFactory.load_dataset(config, tokenizer)


def single_device_mesh():
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_loss_and_accuracy_are_means_over_masked_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    masks = (rng.random((2, 5)) > 0.4).astype(np.float32)
    loss_sum, correct, count, _ = token_sums(jnp.asarray(logits), jnp.asarray(targets),
                                          jnp.asarray(masks))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    keep = masks > 0
    np.testing.assert_allclose(loss_sum / count, nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(correct / count, (logits.argmax(-1) == targets)[keep].mean())
    assert count == keep.sum()


def run_loop(mesh, tmp_path, initial=None, steps=3):
    """Three steps of a small FoT model (memory layer, C=2 with stepping, doc_aware_k2) with an
    eval model of its own (C=0, doc_aware_k1), from ``initial`` (host arrays) or a fresh
    state; the records the loop logged and the initial state."""
    train, evaluation = dataset("doc_aware_k2"), dataset("doc_aware_k1",
                                                         path="data/tiny_eval.jsonl")
    base = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    trainer = Trainer(mesh, with_cross_batch(base, 2, True, 2), OPTIMIZER, "fp32",
                      with_cross_batch(base, 0, False, 1))
    logger = logging_utils.MetricsLogger(str(tmp_path), logging_utils.get_default_config(
        {"tensorboard": False, "plot": False}))
    settings = LoopSettings(total_steps=steps, log_freq=1, eval_freq=steps, eval_steps=1,
                            show_progress=False)
    with jax.set_mesh(mesh):
        if initial is None:
            initial = jax.device_get(trainer.init_state(0))
        fit(trainer, jax.device_put(initial, trainer.state_shardings), train, settings, logger,
            evaluation)
    logger.close()
    return logging_utils.read_metrics(str(tmp_path / logging_utils.METRICS_FILE)), initial


@pytest.mark.slow
def test_same_losses_on_one_device_and_on_8_device_meshes(tmp_path):
    assert jax.device_count() == 8
    expected, initial = run_loop(single_device_mesh(), tmp_path / "one")
    keys = ("train/loss", "train/accuracy", "train/gradient_norm", "eval/loss")
    losses = [r["train/loss"] for r in expected if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    for mesh_dim in ("1,-1,1", "2,2,2"):
        records, _ = run_loop(get_jax_mesh(mesh_dim), tmp_path / mesh_dim, initial)
        assert [r["step"] for r in records] == [r["step"] for r in expected]
        for got, want in zip(records, expected):
            for key in keys:
                if key in want:
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                               err_msg=f"{mesh_dim} step {want['step']} {key}")
            assert got.get("train/dataset/dataset_total_tokens") == want.get(
                "train/dataset/dataset_total_tokens")


def tiny_config(**updates):
    """The shared tiny model cut to one memory layer of 2 heads (no GQA: a model-parallel mesh
    splits the heads) over the tiny tokenizer's 512 tokens."""
    return helpers.tiny_config(**dict(dict(
        vocab_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=None, mem_layers=(0,)), **updates))


@pytest.fixture(scope="module")
def tiny_initial():
    """A fresh train state of ``tiny_config()`` as host arrays (cross-batch settings and
    accumulation do not change its structure)."""
    mesh = single_device_mesh()
    with jax.set_mesh(mesh):
        return jax.device_get(Trainer(mesh, tiny_config(), OPTIMIZER).init_state(0))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_full_batch_step(tiny_initial):
    # C=1 with k=2 and stepping: no row looks past its own document group, so cutting the
    # batch into micro-batches of whole groups changes nothing.
    config = tiny_config(cross_batch_range=1, cross_batch_stepping=True, dataset_packing=2)
    batch, _ = next(iter(dataset("doc_aware_k2")))
    mesh = single_device_mesh()
    results = []
    for steps in (1, 4):
        trainer = Trainer(mesh, config, optimizer_config(
            dict(OPTIMIZER.to_dict(), accumulate_gradient_steps=steps)))
        with jax.set_mesh(mesh):
            state, metrics = trainer.train_step(jax.device_put(tiny_initial),
                                                trainer.global_batch(batch, 8))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (params, metrics), others = results[0], results[1:]
    for other_params, other_metrics in others:
        for key in ("loss", "accuracy", "gradient_norm"):
            np.testing.assert_allclose(other_metrics[key], metrics[key], rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                               other_params, params)


@pytest.mark.slow
def test_non_finite_updates_are_skipped_and_counted(tiny_initial):
    mesh = single_device_mesh()
    trainer = Trainer(mesh, tiny_config(), OPTIMIZER, skip_nonfinite=True)
    batch, _ = next(iter(dataset("doc_aware")))
    with jax.set_mesh(mesh):
        state = jax.device_put(tiny_initial)
        kernel = state["params"]["lm_head"]["kernel"]
        state["params"]["lm_head"]["kernel"] = kernel.at[0, 0].set(jnp.nan)
        before = jax.device_get(state)
        state, metrics = trainer.train_step(state, trainer.global_batch(batch, 8))
    after = jax.device_get(state)
    assert int(after["step"]) == 1 and int(after["skipped_steps"]) == 1
    assert int(metrics["skipped_steps"]) == 1 and not np.isfinite(metrics["loss"])
    for key in ("params", "opt_state"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, after[key], before[key])


def test_global_batch_takes_a_pipeline_batch_or_a_mapping_of_its_fields():
    mesh = single_device_mesh()
    trainer = Trainer(mesh, tiny_config(), OPTIMIZER)
    batch, _ = next(iter(dataset("doc_aware")))
    with jax.set_mesh(mesh):
        for given in (batch, dict(batch.items())):  # a custom dataset may yield a dict
            placed = trainer.global_batch(given, 8)
            assert isinstance(placed, Batch) and all(isinstance(x, jax.Array) for x in placed)
            for got, want in zip(placed, batch):
                np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError, match="the batch lacks loss_masks"):
            trainer.global_batch({"input_tokens": batch.input_tokens,
                                  "target_tokens": batch.target_tokens}, 8)


def test_flop_count_is_the_written_formula():
    config = tiny_config(num_hidden_layers=3, mem_layers=(1, 2))
    b, length = 8, 16
    h, d, heads = 32, 16, 2
    params = 3 * (4 * h * h + 3 * h * 64) + h * 512
    local = 3 * 4 * b * heads * d * length ** 2 / 2
    plain = flops_per_step(config, b, length)
    assert plain == 3 * (2 * params * b * length + local)
    fot = with_cross_batch(config, 2, True, 2)
    extra = int(np.sum(allowed_slots(b, 2, 2, True) - 1)) * 2  # two memory layers
    assert flops_per_step(fot, b, length) - plain == 3 * 4 * heads * d * length ** 2 * extra
    assert flops_per_step(config, b, length, training=False) * 3 == plain
    # A GLA layer in place of the softmax layer: its gate projections (h x 16, 16 x h) and
    # output gate (h x h) count as matmul parameters, and its sequence mixing reads and
    # writes a [d, d] state per token and head plus half a chunk of 16 tokens.
    gla = tiny_config(num_hidden_layers=3, mem_layers=(1, 2),
                      attention_type=("gla", "softmax", "softmax"), linear_chunk_size=16)
    gla_params = params + h * 16 + 16 * h + h * h
    mixing = b * length * heads * (4 * d * d + 2 * 16 * d)
    assert flops_per_step(gla, b, length) == 3 * (2 * gla_params * b * length + local * 2 / 3
                                                  + mixing)
    # A SUPRA layer: its feature maps (d x d) map each of the 2 query and 2 key heads.
    supra = gla.replace(attention_type=("supra", "softmax", "softmax"))
    supra_params = params + (heads + 2) * d * d
    assert flops_per_step(supra, b, length) == 3 * (2 * supra_params * b * length
                                                    + local * 2 / 3 + mixing)


@pytest.mark.parametrize("mesh_dim", ["1,-1,1", "2,2,2", "1,1,8"])
def test_single_process_feeds_every_row(mesh_dim):
    assert data_split(get_jax_mesh(mesh_dim)) == (0, 1)


def test_metrics_file_drops_records_after_the_resumed_step(tmp_path):
    config = logging_utils.get_default_config({"tensorboard": False, "plot": False})
    logger = logging_utils.MetricsLogger(str(tmp_path), config)
    for step in range(1, 6):
        logger.write(step, {"train/loss": float(step)})
    logger.close()
    logger = logging_utils.MetricsLogger(str(tmp_path), config, resume_step=3)
    logger.write(4, {"train/loss": 40.0})
    logger.close()
    with open(tmp_path / logging_utils.METRICS_FILE) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["train/loss"]) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_step_equals_full_logits_step(tiny_initial, tied):
    # The trainer's chunked cross-entropy (default) against full logits: same loss, accuracy
    # and update, for an untied head and for one tied to the input embedding.
    config = tiny_config(cross_batch_range=1, dataset_packing=2, tie_word_embeddings=tied)
    batch, _ = next(iter(dataset("doc_aware_k2")))
    mesh = single_device_mesh()
    initial = tiny_initial
    if tied:
        initial = dict(initial, params={k: v for k, v in initial["params"].items()
                                        if k != "lm_head"})
        initial["opt_state"] = jax.device_get(
            Trainer(mesh, config, OPTIMIZER).tx.init(initial["params"]))
    results = []
    for chunk in (0, 40):  # 40 tokens of 8 rows: chunks of 5 positions
        trainer = Trainer(mesh, config, OPTIMIZER, loss_chunk_tokens=chunk)
        with jax.set_mesh(mesh):
            state, metrics = trainer.train_step(jax.device_put(initial),
                                                trainer.global_batch(batch, 8))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (params, metrics), (c_params, c_metrics) = results
    for key in ("loss", "accuracy", "gradient_norm"):
        np.testing.assert_allclose(c_metrics[key], metrics[key], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           c_params, params)


@pytest.mark.slow
def test_z_loss_is_added_to_the_objective_and_logged_apart(tiny_initial):
    """With z_loss the step's ``loss`` is still the cross-entropy, ``z_loss`` is the
    coefficient times the mean logsumexp^2 of the initial model's logits, and the gradient
    differs from the step without it; chunked and full logits agree, also with
    accumulation."""
    config = tiny_config(cross_batch_range=1, cross_batch_stepping=True, dataset_packing=2)
    batch, _ = next(iter(dataset("doc_aware_k2")))
    mesh = single_device_mesh()
    runs = {}
    for z_loss, chunk, accumulate in ((0.0, 40, 1), (0.5, 40, 1), (0.5, 0, 1), (0.5, 40, 2)):
        trainer = Trainer(mesh, config, optimizer_config(dict(
            OPTIMIZER.to_dict(), accumulate_gradient_steps=accumulate)),
            loss_chunk_tokens=chunk, z_loss=z_loss)
        with jax.set_mesh(mesh):
            global_batch = trainer.global_batch(batch, 8)
            state, metrics = trainer.train_step(jax.device_put(tiny_initial), global_batch)
            if z_loss == 0.0:
                logits = trainer.model.apply({"params": jax.device_put(
                    tiny_initial["params"])}, global_batch.input_tokens).logits
        runs[(z_loss, chunk, accumulate)] = (jax.device_get(state["params"]),
                                             jax.device_get(metrics))
    counted = np.asarray(batch["loss_masks"]) > 0
    lse = np.asarray(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
    _, plain = runs[(0.0, 40, 1)]
    assert "z_loss" not in plain
    params, metrics = runs[(0.5, 40, 1)]
    np.testing.assert_allclose(metrics["loss"], plain["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], 0.5 * np.mean(lse[counted] ** 2), rtol=1e-5)
    # the z term reaches the gradient (the first step's learning rate is 0 in warm-up, so
    # the parameters themselves do not move yet)
    assert abs(metrics["gradient_norm"] - plain["gradient_norm"]) > 1e-3 * plain["gradient_norm"]
    for key in ((0.5, 0, 1), (0.5, 40, 2)):
        other_params, other = runs[key]
        for name in ("loss", "z_loss", "gradient_norm"):
            np.testing.assert_allclose(other[name], metrics[name], rtol=1e-5, err_msg=str(key))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                               other_params, params)


class TerminalStream(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def console_run():
    """A function running 4 steps of ``tiny_config()`` (log every 2nd step, evaluate at steps
    0 and 3) with stderr replaced by ``stream`` and the console handler writing to it; the
    lines the ``EasyLM`` logger printed and what reached the stream."""
    mesh = single_device_mesh()
    trainer = Trainer(mesh, tiny_config(), OPTIMIZER)
    settings = LoopSettings(total_steps=4, log_freq=2, eval_freq=3, eval_steps=1,
                            peak_flops_per_device=1e12)

    def run(tmp_path, stream, monkeypatch):
        monkeypatch.setattr(sys, "stderr", stream)
        console = logging.getLogger("EasyLM")
        handler = logging.StreamHandler(stream)  # the CLI's console handler: stderr
        monkeypatch.setattr(console, "handlers", [handler])
        level = console.level
        console.setLevel(logging.INFO)  # setLevel, not the attribute: it clears level caches
        logger = logging_utils.MetricsLogger(str(tmp_path), logging_utils.get_default_config(
            {"tensorboard": False, "plot": False}))
        try:
            with jax.set_mesh(mesh):
                fit(trainer, trainer.init_state(0), dataset("doc_aware"), settings, logger,
                    dataset("doc_aware", path="data/tiny_eval.jsonl"))
        finally:
            console.setLevel(level)
            logger.close()
        return stream.getvalue()
    return run


@pytest.mark.slow
def test_console_logs_a_line_per_logged_step_and_a_summary_without_a_bar_when_redirected(
        console_run, tmp_path, monkeypatch):
    text = console_run(tmp_path, io.StringIO(), monkeypatch)
    assert "\r" not in text  # no progress bar in a redirected log
    lines = text.splitlines()
    assert lines[0].startswith("step 0/4 | eval loss ")
    step2, step3, step4 = (next(line for line in lines if line.startswith(f"step {s}/4 |"))
                           for s in (2, 3, 4))
    for line in (step2, step3, step4):
        for part in ("| loss ", "| lr ", "| grad norm ", " tok/s |", "| MFU "):
            assert part in line, (part, line)
    assert "eval loss" in step3 and "eval loss" not in step2 + step4
    assert "compilation" in step2 and "compilation" not in step3
    summary = "\n".join(lines[lines.index(step4) + 1:])
    assert "finished steps 1-4 of 4" in summary
    assert re.search(r"final train loss \d\.\d{4} .* at step 4 \| final eval loss \d\.\d{4} "
                     r".* at step 3", summary), summary
    assert re.search(r"throughput [\d,]+ tok/s \| MFU .* \(steps 3-4\)", summary), summary
    assert f"outputs in {tmp_path}: metrics.jsonl" in summary


@pytest.mark.slow
def test_console_shows_a_bar_on_a_terminal_with_the_lines_above_it(
        console_run, tmp_path, monkeypatch):
    text = console_run(tmp_path, TerminalStream(), monkeypatch)
    assert "train: 100%" in text
    segments = re.split(r"[\r\n]", text)
    for step in (0, 2, 3, 4):  # each line is a line of its own, never glued to the bar
        assert any(segment.startswith(f"step {step}/4 |") for segment in segments), text
    assert not any("it/s" in segment and "/4 |" in segment for segment in segments), text


def test_only_the_trainable_parameters_train_and_hold_optimizer_state():
    """optimizer.trainable on a sharded mesh: the matched parameters move, the others stay bit
    for bit, Adam keeps moments for the matched ones only, and patterns matching nothing are
    refused naming the key and what paths look like."""
    from EasyLM.config import ConfigError
    pattern = r"h/0/attention/w[qk]/"
    config = tiny_config()
    mesh = get_jax_mesh("1,-1,1")
    trainer = Trainer(mesh, config, optimizer_config(dict(OPTIMIZER.to_dict(),
                                                          trainable=pattern)))
    shapes = trainer.state_shapes["params"]
    named = {tree_path_name(path): int(np.prod(leaf.shape))
             for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    trained = {name for name in named if re.search(pattern, name)}
    assert trained == {"transformer/h/0/attention/wq/kernel", "transformer/h/0/attention/wk/kernel"}
    assert trainer.trainable_counts == (sum(named[n] for n in trained), sum(named.values()))
    moments = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(
        trainer.state_shapes["opt_state"]) if leaf.ndim)
    assert moments == 2 * trainer.trainable_counts[0]  # Adam's mu and nu, nothing else
    batch, _ = next(iter(dataset("doc_aware")))
    with jax.set_mesh(mesh):
        state = trainer.init_state(0)
        before = jax.device_get(state["params"])
        for _ in range(2):
            state, metrics = trainer.train_step(state, trainer.global_batch(batch, 8))
        after = jax.device_get(state["params"])
    assert np.isfinite(metrics["loss"])
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree_util.tree_leaves(after)):
        if tree_path_name(path) in trained:
            assert not np.array_equal(old, new), tree_path_name(path)
        else:
            np.testing.assert_array_equal(old, new, err_msg=tree_path_name(path))
    with pytest.raises(ConfigError, match=r"optimizer.trainable='mlp/' matches no parameter; "
                                          r"paths look like lm_head/kernel, transformer/h/0/"):
        Trainer(mesh, config, optimizer_config(dict(OPTIMIZER.to_dict(), trainable="mlp/")))
    with pytest.raises(ConfigError, match=r"optimizer.trainable: bad regex '\('"):
        Trainer(mesh, config, optimizer_config(dict(OPTIMIZER.to_dict(), trainable="(")))
