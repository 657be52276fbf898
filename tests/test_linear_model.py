"""Linear attention (SUPRA, GLA) as layer options of the model: named configs, parameters and
partition rules, scanned layers, the SUPRA layer against its written formula, a pretrained
LLaMA converted to SUPRA, and linear layers beside FoT memory layers in training and windowed
inference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from EasyLM import cli
from EasyLM.jax_utils import get_jax_mesh, match_partition_rules, named_shardings
from EasyLM.models.llama import convert_hf_to_easylm
from EasyLM.models.llama.attention import layer_attention_types
from EasyLM.models.llama.attention.linear import SupraAttention, supra_log_decay
from EasyLM.models.llama.llama_model import (STANDARD_CONFIGS, FlaxLLaMAForCausalLMModule,
                                             LLaMAConfig, get_partition_rules)
from EasyLM.models.llama.rope import apply_rope
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.inference import MemoryOptions
from helpers import tiny_config

SUPRA = dict(mem_layers=(), attention_type="supra")
GLA = dict(mem_layers=(), attention_type="gla")
DOCS_PAGES = ("docs/linear.md",)  # read through docs_page_run (conftest runs it ahead)


def abstract_params(config):
    return jax.eval_shape(FlaxLLaMAForCausalLMModule(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]


def test_named_linear_configs_and_their_errors():
    for size in ("debug", "25m", "100m"):
        for family in ("supra", "gla"):
            config = LLaMAConfig(**STANDARD_CONFIGS[f"{size}_{family}"])
            assert set(layer_attention_types(config)) == {family}
            plain = LLaMAConfig(**STANDARD_CONFIGS[size])
            assert (config.hidden_size, config.num_hidden_layers) == (
                plain.hidden_size, plain.num_hidden_layers)
    with pytest.raises(ValueError, match="linear_chunk_size 40 must be a positive multiple "
                                         "of 16"):
        tiny_config(linear_chunk_size=40)
    with pytest.raises(ValueError, match=r"linear_implementation 'fast': choose one of "
                                         r"\('auto', 'scan', 'chunked', 'pallas'\)"):
        tiny_config(linear_implementation="fast")
    with pytest.raises(ValueError, match="linear_chunk_size 48: the pallas linear attention "
                                         "kernel takes 16, 32, 64 or 128"):
        tiny_config(linear_implementation="pallas", linear_chunk_size=48)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["supra", "gla"])
def test_the_kernel_in_a_model_equals_the_chunked_form(family):
    """A model of linear layers (GQA) gives the same loss and parameter gradients with the
    fused kernel (interpreted on CPU) as with the chunked form."""
    def loss_and_grads(implementation):
        config = tiny_config(attention_type=family, mem_layers=(), num_hidden_layers=2,
                             hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             linear_implementation=implementation, linear_chunk_size=16)
        model = FlaxLLaMAForCausalLMModule(config)
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, config.vocab_size)
        params = model.init(jax.random.PRNGKey(0), tokens)["params"]

        def loss(params):
            logits = model.apply({"params": params}, tokens).logits
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.value_and_grad(loss)(params)

    (want, want_grads), (got, got_grads) = (loss_and_grads(name) for name in
                                            ("chunked", "pallas"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_parameters_and_partition_rules_on_8_devices():
    assert jax.device_count() == 8
    gqa = tiny_config(**SUPRA, num_key_value_heads=1, vocab_size=64)
    attention = abstract_params(gqa)["transformer"]["h"]["0"]["attention"]
    head_dim = gqa.head_dim
    assert attention["feature_map"]["kernel"].shape == (head_dim, head_dim)
    assert attention["key_feature_map"]["bias"].shape == (head_dim,)
    mha = abstract_params(tiny_config(**SUPRA, vocab_size=64, num_key_value_heads=None))[
        "transformer"]["h"]["0"]
    assert "key_feature_map" not in mha["attention"]  # queries and keys share one map
    gla = tiny_config(**dict(GLA, mem_layers=(1,)), vocab_size=64)
    shapes = abstract_params(gla)
    attention = shapes["transformer"]["h"]["0"]["attention"]
    assert attention["gate_down"]["kernel"].shape == (gla.hidden_size, 16)
    assert attention["gate_up"]["kernel"].shape == (16, gla.hidden_size)
    assert attention["ogate"]["kernel"].shape == (gla.hidden_size, gla.hidden_size)
    specs = match_partition_rules(get_partition_rules(), shapes)
    gate = specs["transformer"]["h"]["0"]["attention"]["gate_down"]["kernel"]
    assert gate == jax.sharding.PartitionSpec("fsdp", None)
    arrays = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    for mesh_dim in ("1,-1,1", "2,2,2", "1,1,8"):
        placed = jax.device_put(arrays, named_shardings(get_jax_mesh(mesh_dim), specs))
        assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(arrays)


@pytest.mark.slow
def test_supra_layer_is_its_written_formula():
    """One SUPRA layer against the formula, written out in numpy with materialised weights:
    y_i = GroupNorm(sum_{j<=i} gamma_h^(i-j) phi(q_i) . phi(k_j) / sqrt(d) v_j) W_o."""
    config = tiny_config(**SUPRA, num_key_value_heads=2)  # GQA: keys have their own map
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    hidden = jax.random.normal(jax.random.PRNGKey(0), (1, 12, config.hidden_size))
    positions = jnp.arange(12)[None]
    layer = SupraAttention(config)
    variables = layer.init(jax.random.PRNGKey(1), hidden, positions)
    # Random feature maps, so that the identity start is not what makes the test pass.
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    for i, name in enumerate(("feature_map", "key_feature_map")):
        keys = jax.random.split(jax.random.PRNGKey(10 + i))
        params[name] = {"kernel": jax.random.normal(keys[0], (d, d)) / 4,
                        "bias": jax.random.normal(keys[1], (d,)) / 4}
    out = np.asarray(layer.apply({"params": params}, hidden, positions).hidden)

    def proj(name, width):
        return np.asarray(hidden[0] @ params[name]["kernel"]).reshape(12, width, d)

    def phi(x, name):
        return np.maximum(x @ np.asarray(params[name]["kernel"]) + np.asarray(
            params[name]["bias"]), 0)

    inv_freq = layer.bind({"params": params}).inverse_frequencies()
    q = np.asarray(apply_rope(jnp.asarray(phi(proj("wq", heads), "feature_map"))[None],
                              positions, inv_freq))[0]
    k = np.asarray(apply_rope(jnp.asarray(phi(proj("wk", kv_heads), "key_feature_map"))[None],
                              positions, inv_freq))[0]
    v = proj("wv", kv_heads)
    gamma = np.exp(np.asarray(supra_log_decay(heads)))
    y = np.zeros((12, heads, d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(12):
            for j in range(i + 1):
                y[i, h] += gamma[h] ** (i - j) * (q[i, h] @ k[j, g]) / np.sqrt(d) * v[j, g]
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    want = y.reshape(12, heads * d) @ np.asarray(params["wo"]["kernel"])
    np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["supra", "gla"])
def test_linear_layers_scanned_equal_them_unrolled(family):
    from test_forgetting_model import check_scanned_equals_unrolled
    check_scanned_equals_unrolled(tiny_config(attention_type=family, mem_layers=(1,),
                                              num_hidden_layers=4, cross_batch_range=1),
                                  length=40)


@pytest.mark.slow
def test_pretrained_llama_converted_to_supra(tmp_path, capsys):
    from test_model import tiny_hf_model
    hf_dir = tmp_path / "hf"
    tiny_hf_model(hf_dir, kv_heads=2)
    out = tmp_path / "supra"
    convert_hf_to_easylm.main(["--hf_model", str(hf_dir), "--output", str(out),
                               "--attention_type", "supra"])
    assert "attention supra, supra, supra" in capsys.readouterr().out
    from EasyLM.checkpoint import load_llama_config, load_params
    config = load_llama_config(str(out))
    variables = load_params(f"params::{out}")
    attention = variables["params"]["transformer"]["h"]["1"]["attention"]
    for name in ("feature_map", "key_feature_map"):  # GQA: keys have their own
        np.testing.assert_array_equal(attention[name]["kernel"], np.eye(config.head_dim))
        np.testing.assert_array_equal(attention[name]["bias"], 0)
    # Every pretrained weight is kept.
    converted, _ = convert_hf_to_easylm.convert(str(hf_dir))
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted["params"]["lm_head"],
                           variables["params"]["lm_head"])
    np.testing.assert_array_equal(attention["wq"]["kernel"],
                                  converted["params"]["transformer"]["h"]["1"]["attention"][
                                      "wq"]["kernel"])
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 64))
    logits = np.asarray(FlaxLLaMAForCausalLMModule(config).apply(variables, tokens).logits)
    assert np.all(np.isfinite(logits))
    with pytest.raises(cli.UsageError, match="--attention_type gla: gated linear attention is "
                                             "trained from scratch here"):
        convert_hf_to_easylm.uptraining_from_args(type("Args", (), dict(
            attention_type="gla", forget_gate_bias=None, forgetting_kv_shift=False,
            forgetting_qk_norm=False, forgetting_output_gate=False, kv_shift_bias=-10.0))())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["supra", "gla"])
def test_linear_layers_beside_fot_memory_train_and_run_windowed(tmp_path, family):
    from test_forgetting_model import train_with_memory
    # Layers 0 and 2 linear, layer 1 an FoT memory layer; doc_aware_k2 rows of 32 tokens,
    # C = 2 with stepping, z-loss on.
    base = tiny_config(attention_type=family, mem_layers=(1,), vocab_size=512,
                       intermediate_size=64, linear_chunk_size=16)
    records, params = train_with_memory(base, tmp_path, steps=4, z_loss=1e-4)
    losses = [r["train/loss"] for r in records]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(r["train/z_loss"] > 0 for r in records)

    # The stream in one window: windowed inference equals the training model on the row.
    length = 48
    tokens = np.random.default_rng(0).integers(0, 512, size=(1, length))
    expected = np.asarray(FlaxLLaMAForCausalLMModule(base).apply(
        {"params": params}, jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(WindowedLM(params, base, MemoryOptions(length)).logits(tokens),
                               expected, atol=5e-5)
    # Windows of 16 over three windows: the linear layers carry their state through the
    # windows, the memory layer reads the earlier windows; window by window equals token by
    # token, and a row padded in front equals it unpadded.
    model = WindowedLM(params, base, MemoryOptions(16))
    windowed = model.logits(tokens)
    state = model.new_state(1)
    stepped = np.concatenate([np.asarray(model.step(state, jnp.asarray(tokens[:, i:i + 1])))
                              for i in range(length)], axis=1)
    np.testing.assert_allclose(stepped, windowed, atol=5e-5)
    padded = np.concatenate([tokens, np.concatenate(
        [np.zeros((1, 16), np.int64), tokens[:, :-16]], axis=1)])
    mask = np.ones(padded.shape, bool)
    mask[1, :16] = False
    logits = model.logits(padded, mask)
    np.testing.assert_allclose(logits[0], windowed[0], atol=5e-5)
    short = model.logits(tokens[:, :-16])
    np.testing.assert_allclose(logits[1, 16:], short[0], atol=5e-5)
    assert torch is not None  # the converter test's model comes from PyTorch


@pytest.mark.slow
def test_the_supra_uptraining_recipe_runs_end_to_end(docs_page_run):
    """docs/linear.md's cpu blocks (experiments/uptrain.sh supra on a random tiny GQA LLaMA,
    its probe stage, and GLA from scratch): the converted model, the run and the evaluations
    they write."""
    import json
    import os

    from EasyLM.checkpoint import load_llama_config
    from helpers import REPO
    checkout, done = docs_page_run(os.path.join(REPO, "docs", "linear.md"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    out = checkout / "runs" / "supra_cpu"
    assert load_llama_config(str(out / "supra_init")).attention_type == "supra"
    assert list((out / "supra").glob("*/checkpoints/step_4"))
    metrics = [json.loads(line) for line in next((out / "supra").glob("*/metrics.jsonl"))
               .read_text().splitlines()]
    assert any(record.get("train/z_loss", 0) > 0 for record in metrics)  # the config's 1e-4
    results = {path.parent.name: json.loads(path.read_text())
               for path in (out / "eval" / "supra").glob("*/loss_by_position.json")}
    assert sorted(results) == ["base_long", "base_native", "init_native", "supra_long",
                               "supra_native", "supra_native_step_2"]
    for name, result in results.items():
        assert np.isfinite(result["with_memory"]).all(), name
    # The SUPRA model reads the long documents in one window of their length (its state
    # carries any length); training moved it from its starting point.
    assert results["supra_long"]["last_context_length"] == 256
    assert results["supra_native"]["with_memory"] != results["init_native"]["with_memory"]
    table = (out / "eval" / "supra" / "report" / "position_loss.md").read_text()
    assert "| SUPRA init on 128 | 2 |" in table and "| SUPRA on 256 | 2 |" in table
    # loss against training tokens: the checkpoints of steps 2 and 4 of 4 x 128 tokens a step
    tokens = (out / "eval" / "supra" / "report" / "token_loss.md").read_text().splitlines()
    assert tokens[0] == "| model | training tokens | loss within 64 | loss within 128 |"
    assert tokens[3].startswith("| step_2 | 1,024 |") and tokens[4].startswith("| step_4 | 2,048 |")
    assert (out / "eval" / "supra" / "report" / "token_loss.png").stat().st_size > 0
    # The probe stage: each layer converted alone, against the base model.
    probe = json.loads((out / "eval" / "supra" / "probe" / "probe.json").read_text())
    assert [row["layer"] for row in probe["layers"]] == [0, 1]
    assert (probe["num_docs"], probe["length"]) == (2, 128)
    assert all(np.isfinite(row["rms_ratio"]) for row in probe["layers"])
    gla = checkout / "runs" / "code_gla_cpu"
    assert load_llama_config(str(next(gla.glob("gla/*/checkpoints/step_10")))
                             ).attention_type == "gla"
    assert np.isfinite(json.loads((gla / "eval_gla" / "loss_by_position.json").read_text())[
        "with_memory"]).all()
