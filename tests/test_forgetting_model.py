"""Forgetting attention (FoX) as a layer option of the model: the per-layer attention_type and
the FoX switches in the config, the gates' parameters and partition rules, long windows in
bounded memory, FLOPs, uptraining a pretrained LLaMA, and FoX layers beside FoT memory layers
in training and windowed inference."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from EasyLM import logging_utils
from EasyLM.config import ConfigError
from EasyLM.flops import flops_per_step
from EasyLM.jax_utils import get_jax_mesh, match_partition_rules, named_shardings
from EasyLM.models.llama import convert_hf_to_easylm, llama_train
from EasyLM.models.llama.attention import attention_family, layer_attention_types
from EasyLM.models.llama.attention.forgetting import (WINDOW_QUERY_BLOCK, ForgettingAttention,
                                                      default_forget_gate_bias,
                                                      uptraining_gates)
from EasyLM.models.llama.attention.interface import StateShape
from EasyLM.models.llama.llama_model import (STANDARD_CONFIGS, FlaxLLaMAForCausalLMModule,
                                             LLaMAConfig, get_partition_rules,
                                             with_cross_batch)
from EasyLM.models.llama.windowed_lm import WindowedLM
from EasyLM.trainer import LoopSettings, Trainer, fit
from FoT.inference import MemoryOptions, Piece
from helpers import tiny_config

FOX = dict(mem_layers=(), attention_type="forgetting")
PRO = dict(FOX, forgetting_kv_shift=True, forgetting_qk_norm=True, forgetting_output_gate=True)


def abstract_params(config):
    """The model's parameters as shapes and dtypes (``jax.ShapeDtypeStruct``)."""
    return jax.eval_shape(FlaxLLaMAForCausalLMModule(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]


def attention_shapes(config):
    """``{submodule: {parameter: shape}}`` of one FoX layer's attention."""
    hidden = jnp.zeros((1, 8, config.hidden_size))
    params = jax.eval_shape(ForgettingAttention(config).init, jax.random.PRNGKey(0), hidden,
                            jnp.arange(8)[None])["params"]
    return jax.tree_util.tree_map(lambda x: x.shape, params)


def test_attention_type_per_layer_and_its_errors():
    config = tiny_config(num_hidden_layers=4, mem_layers=(1,), attention_type="forgetting")
    assert layer_attention_types(config) == ("forgetting", "fot_memory", "forgetting",
                                             "forgetting")
    listed = tiny_config(num_hidden_layers=4, mem_layers=(1,),
                         attention_type=["softmax", "fot_memory", "forgetting", "softmax"])
    assert listed.attention_type == ("softmax", "fot_memory", "forgetting", "softmax")
    assert layer_attention_types(listed) == ("softmax", "fot_memory", "forgetting", "softmax")
    # A memory layer's entry may also say softmax: it runs FoT memory all the same.
    assert layer_attention_types(listed.replace(
        attention_type=("softmax",) * 4))[1] == "fot_memory"
    errors = {
        "fox": r"attention_type 'fox': unknown attention family; give one of \['forgetting', "
               r"'gla', 'softmax', 'supra'\] or a list",
        "fot_memory": r"attention_type 'fot_memory': memory layers are the layers of "
                      r"mem_layers",
        ("softmax", "forgetting"): r"attention_type lists 2 families for 3 layers "
                                   r"\(num_hidden_layers\)",
        ("softmax", "softmax", "fox"): r"attention_type\[2\] 'fox': unknown attention",
        ("softmax", "forgetting", "softmax"): r"attention_type\[1\] 'forgetting': layer 1 is "
                                              r"in mem_layers and runs FoT memory",
        ("fot_memory", "fot_memory", "softmax"): r"attention_type\[0\] 'fot_memory': memory "
                                                 r"layers are the layers of mem_layers; add 0",
        7: r"attention_type 7: give a family name or a list of one per layer",
    }
    for value, message in errors.items():
        with pytest.raises(ValueError, match=message):
            tiny_config(attention_type=value)  # mem_layers (1,)
    with pytest.raises(ValueError, match="forgetting_kv_shift 'yes' must be true or false"):
        tiny_config(forgetting_kv_shift="yes")
    with pytest.raises(ValueError, match=r"forgetting_implementation 'pallsa': choose one of "
                                         r"\('auto', 'reference'"):
        tiny_config(forgetting_implementation="pallsa")


def test_fox_fields_are_stored_and_forgetting_implementation_is_a_run_flag(tmp_path):
    config = tiny_config(attention_type=["forgetting", "softmax", "forgetting"],
                         forgetting_kv_shift=True, forgetting_use_rope=True,
                         forgetting_implementation="reference")
    stored = config.to_dict()
    assert stored["attention_type"] == ["forgetting", "softmax", "forgetting"]
    assert stored["forgetting_kv_shift"] and "forgetting_implementation" not in stored
    config.to_json_file(tmp_path / "llama_config.json")
    loaded = LLaMAConfig.load_config(f"json::{tmp_path / 'llama_config.json'}")
    assert loaded == config.replace(forgetting_implementation="auto")
    assert json.loads((tmp_path / "llama_config.json").read_text())["attention_type"][0] == \
        "forgetting"
    overrides = llama_train.parse_llama_overrides(
        '{"attention_type": ["softmax", "forgetting", "forgetting"], "forgetting_qk_norm": true}')
    assert tiny_config(mem_layers=()).replace(**overrides).attention_type[1] == "forgetting"
    with pytest.raises(ConfigError, match="forgetting_implementation is a run setting: use "
                                          "--forgetting_implementation"):
        llama_train.parse_llama_overrides('{"forgetting_implementation": "reference"}')
    assert llama_train.get_default_config().forgetting_implementation == "auto"


def test_named_fox_configs():
    for name in ("debug_fox", "25m_fox", "100m_fox", "1b_fox"):
        config = LLaMAConfig.load_config(name)
        assert set(layer_attention_types(config)) == {"forgetting"}, name
        assert not (config.forgetting_use_rope or config.forgetting_kv_shift), name
        pro = LLaMAConfig.load_config(name + "_pro")
        assert pro.forgetting_kv_shift and pro.forgetting_qk_norm and pro.forgetting_output_gate
    for size in ("25m", "100m"):
        plain, fot = STANDARD_CONFIGS[size], dict(STANDARD_CONFIGS[f"{size}_FoT"])
        del fot["mem_layers"]
        assert plain == fot
    # FoX layers beside FoT memory layers: a named size with memory layers added.
    mixed = LLaMAConfig.load_config("25m_fox", mem_layers=(2, 4, 6))
    assert layer_attention_types(mixed).count("fot_memory") == 3


def test_gates_and_pro_switches_in_the_parameter_tree():
    base = {"wq", "wk", "wv", "wo"}
    cases = {(): {"fgate"}, ("forgetting_kv_shift",): {"fgate", "kshift", "vshift"},
             ("forgetting_qk_norm",): {"fgate", "q_norm", "k_norm"},
             ("forgetting_output_gate",): {"fgate", "o_norm", "ogate"},
             ("forgetting_use_rope",): {"fgate"}}
    for switches, own in cases.items():
        config = tiny_config(**FOX, **{name: True for name in switches})
        assert set(attention_shapes(config)) == base | own, switches
    attention = attention_shapes(tiny_config(**PRO))
    assert attention["fgate"] == {"kernel": (32, 4), "bias": (4,)}
    assert attention["kshift"] == attention["vshift"] == {"kernel": (32, 2), "bias": (2,)}
    assert attention["q_norm"] == attention["k_norm"] == attention["o_norm"] == {"kernel": (8,)}
    assert attention["ogate"] == {"kernel": (32, 32)}
    # In the model: FoX layers around a memory layer, which keeps the LLaMA layer's tree.
    layers = abstract_params(tiny_config(**dict(PRO, mem_layers=(1,))))["transformer"]["h"]
    assert set(layers["0"]["attention"]) == set(layers["2"]["attention"]) == set(attention)
    assert set(layers["1"]["attention"]) == base


def test_gates_start_as_the_authors_initialise_them():
    config = tiny_config(**PRO, hidden_size=64, num_key_value_heads=4, initializer_range=0.05)
    layer = ForgettingAttention(config)
    hidden = jnp.ones((1, 4, config.hidden_size))
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), hidden,
                                 jnp.arange(4)[None])["params"]
    for name in ("fgate", "kshift", "vshift"):
        np.testing.assert_array_equal(params[name]["bias"], 0)
        assert 0.04 < float(jnp.std(params[name]["kernel"])) < 0.06, name
    for name in ("q_norm", "k_norm", "o_norm"):
        np.testing.assert_array_equal(params[name]["kernel"], 1)
    assert 0.04 < float(jnp.std(params["ogate"]["kernel"])) < 0.06


def test_partition_rules_cover_every_new_parameter_on_8_devices():
    assert jax.device_count() == 8
    config = tiny_config(**dict(PRO, mem_layers=(1,)), vocab_size=64)
    shapes = abstract_params(config)
    specs = match_partition_rules(get_partition_rules(), shapes)
    attention = specs["transformer"]["h"]["0"]["attention"]
    for name in ("fgate", "kshift", "vshift"):
        assert attention[name]["kernel"] == jax.sharding.PartitionSpec("fsdp", None), name
        assert attention[name]["bias"] == jax.sharding.PartitionSpec(None), name
    assert attention["ogate"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "mp")
    arrays = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    for mesh_dim in ("1,-1,1", "2,2,2", "1,1,8"):  # every axis over all 8 devices, and mixed
        placed = jax.device_put(arrays, named_shardings(get_jax_mesh(mesh_dim), specs))
        assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(arrays)


@pytest.mark.slow
def test_sharded_fox_forward_and_gradients_match_single_device():
    from test_model import sharded_loss_and_grads
    config = tiny_config(**dict(PRO, mem_layers=(1,)), cross_batch_range=1, vocab_size=64,
                         num_attention_heads=8, num_key_value_heads=4, hidden_size=64,
                         num_hidden_layers=2)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 16), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(1), tokens)
    loss, grads = sharded_loss_and_grads(config, variables, tokens, None)
    sharded, sharded_grads = sharded_loss_and_grads(config, variables, tokens, "2,2,2")
    np.testing.assert_allclose(sharded, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                           sharded_grads, grads)


@pytest.mark.slow
def test_fox_layers_scanned_equal_them_unrolled():
    # Layers 2-4 run as one scan over their stacked gates and norms; layer 1 is a memory layer.
    config = tiny_config(**dict(PRO, mem_layers=(1,)), num_hidden_layers=5, cross_batch_range=1)
    check_scanned_equals_unrolled(config, length=16)


def check_scanned_equals_unrolled(config, length):
    """The loss and gradients of ``config`` with ``scan_layers`` equal them unrolled."""
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, length), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(1), tokens)

    def loss_and_grads(model_config):
        def loss(params):
            logits = FlaxLLaMAForCausalLMModule(model_config).apply(params, tokens).logits
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
        return jax.jit(jax.value_and_grad(loss))(variables)

    unrolled, scanned = loss_and_grads(config), loss_and_grads(config.replace(scan_layers=True))
    np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           scanned[1], unrolled[1])


def test_flops_count_the_gates_and_the_attention_of_fox_layers():
    b, length = 4, 16
    plain = tiny_config(mem_layers=())
    h, heads, kv = 32, 4, 2
    gates = {"forgetting": h * heads,
             "pro": h * heads + 2 * h * kv + h * h}
    base = flops_per_step(plain, b, length)
    assert flops_per_step(tiny_config(**FOX), b, length) - base == \
        3 * 2 * 3 * gates["forgetting"] * b * length  # 3 layers; forward + backward
    assert flops_per_step(tiny_config(**PRO), b, length) - base == \
        3 * 2 * 3 * gates["pro"] * b * length
    # FoX layers beside a memory layer: that one counts its cross-batch slots as before.
    fot = with_cross_batch(tiny_config(), 2)
    mixed = with_cross_batch(tiny_config(attention_type="forgetting"), 2)
    assert flops_per_step(mixed, b, length) - flops_per_step(fot, b, length) == \
        3 * 2 * 2 * gates["forgetting"] * b * length


def test_long_window_piece_holds_no_full_score_matrix():
    window, config = 4096, tiny_config(**PRO, max_sequence_length=4096)
    family = attention_family("forgetting")
    layer = family(config)
    hidden = jnp.zeros((1, window, config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(window), (1, window))
    variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), hidden[:, :8],
                               positions[:, :8])
    state = family.empty_state(config, StateShape(1, window, None, jnp.float32, jnp.float32))
    ones = jnp.ones(1, jnp.int32)
    piece = Piece(ones * 0, ones * 0, ones * window, ones * 0, 0, window)
    compiled = jax.jit(lambda v, h, p, s: layer.apply(v, h, p, None, s, piece)).lower(
        variables, hidden, positions, state).compile()
    scores = config.num_attention_heads * window * window * 4  # [B, H, n, W] float32
    assert window > WINDOW_QUERY_BLOCK
    assert compiled.memory_analysis().temp_size_in_bytes < scores / 2


@pytest.mark.slow
def test_windows_longer_than_a_query_block_equal_the_training_model():
    window = WINDOW_QUERY_BLOCK + 88  # one full block and a remainder
    config = tiny_config(**PRO, max_sequence_length=window, num_hidden_layers=1)
    tokens = np.random.default_rng(0).integers(0, 61, size=(1, window))
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(0), tokens[:, :8])
    expected = FlaxLLaMAForCausalLMModule(config).apply(variables, tokens).logits
    model = WindowedLM(variables, config, MemoryOptions(window))
    np.testing.assert_allclose(model.logits(tokens), expected, atol=2e-5)


def test_uptraining_gates_and_refusals():
    assert default_forget_gate_bias(2048) == 14.6
    for length in (128, 2048, 131072):
        bias = default_forget_gate_bias(length)
        assert 0.9e-3 < length * np.log1p(np.exp(-bias)) < 1e-3
    config = tiny_config(**FOX, forgetting_kv_shift=True)
    gates = uptraining_gates(config, 12.0)
    np.testing.assert_array_equal(gates["fgate"]["kernel"], np.zeros((32, 4)))
    np.testing.assert_array_equal(gates["fgate"]["bias"], np.full(4, 12.0))
    assert gates["kshift"]["bias"].shape == (2,) and gates["vshift"]["bias"][0] == -10.0
    for switch in ("forgetting_qk_norm", "forgetting_output_gate"):
        with pytest.raises(ValueError, match="cannot start as the pretrained model"):
            uptraining_gates(tiny_config(**FOX, **{switch: True}), 12.0)


def test_uptraining_command_line_refusals(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    cases = {
        ("--attention_type", "forgetting", "--forgetting_qk_norm"):
            "--forgetting_qk_norm: cannot start as the pretrained model: its RMS norm",
        ("--attention_type", "forgetting", "--forgetting_output_gate"):
            "--forgetting_output_gate: cannot start as the pretrained model",
        ("--forgetting_kv_shift",): "--forgetting_kv_shift: uptraining options; add "
                                    "--attention_type forgetting",
    }
    for flags, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            convert_hf_to_easylm.main(["--hf_model", str(hf), "--output",
                                       str(tmp_path / "out"), *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_uptrained_fox_model_computes_the_pretrained_llama(tmp_path, capsys):
    from test_model import tiny_hf_model
    hf_dir = tmp_path / "hf"
    base = tiny_hf_model(hf_dir, kv_heads=2)
    # The native context (max_position_embeddings): where the default gates promise < 1e-3
    # of decay.
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 128))
    with torch.no_grad():
        expected = base(torch.tensor(tokens)).logits.numpy()
    out = tmp_path / "fox"
    convert_hf_to_easylm.main(["--hf_model", str(hf_dir), "--output", str(out),
                               "--attention_type", "forgetting", "--forgetting_kv_shift"])
    assert "attention forgetting, forgetting, forgetting" in capsys.readouterr().out
    from EasyLM.checkpoint import load_llama_config, load_params
    config = load_llama_config(str(out))
    assert set(layer_attention_types(config)) == {"forgetting"}
    assert config.forgetting_use_rope and config.forgetting_kv_shift
    variables = load_params(f"params::{out}")
    gate = variables["params"]["transformer"]["h"]["0"]["attention"]["fgate"]
    np.testing.assert_array_equal(gate["bias"], np.float32(default_forget_gate_bias(128)))
    logits = np.asarray(FlaxLLaMAForCausalLMModule(config).apply(variables, tokens).logits)
    np.testing.assert_allclose(logits, expected, atol=1.5e-4 * np.abs(expected).max())
    # One family per layer: the softmax layer converts as it was.
    mixed, mixed_config = convert_hf_to_easylm.convert(
        str(hf_dir), uptraining=convert_hf_to_easylm.Uptraining(
            ("softmax", "forgetting", "softmax"), forget_gate_bias=30.0))
    assert "fgate" not in mixed["params"]["transformer"]["h"]["0"]["attention"]
    logits = FlaxLLaMAForCausalLMModule(mixed_config).apply(mixed, tokens).logits
    np.testing.assert_allclose(logits, expected, atol=1e-5 * np.abs(expected).max())


def train_with_memory(base, tmp_path, steps, **trainer_options):
    """``steps`` steps of ``base`` through the Trainer on doc_aware_k2 rows of the tiny corpus
    (C = 2 with stepping): the logged training records and the final parameters."""
    from test_trainer import OPTIMIZER, dataset, single_device_mesh
    mesh = single_device_mesh()
    trainer = Trainer(mesh, with_cross_batch(base, 2, True, 2), OPTIMIZER, "fp32",
                      **trainer_options)
    logger = logging_utils.MetricsLogger(str(tmp_path), logging_utils.get_default_config(
        {"tensorboard": False, "plot": False}))
    with jax.set_mesh(mesh):
        state = fit(trainer, trainer.init_state(0), dataset("doc_aware_k2"),
                    LoopSettings(total_steps=steps, log_freq=1, show_progress=False), logger)
    logger.close()
    records = [r for r in logging_utils.read_metrics(
        str(tmp_path / logging_utils.METRICS_FILE)) if "train/loss" in r]
    return records, jax.device_get(state["params"])


@pytest.mark.slow
def test_fox_layers_beside_fot_memory_train_and_run_windowed(tmp_path):
    # Layers 0 and 2 FoX (Pro), layer 1 an FoT memory layer; doc_aware_k2 rows of 32 tokens,
    # C = 2 with stepping.
    base = tiny_config(**dict(PRO, mem_layers=(1,)), vocab_size=512, intermediate_size=64)
    records, params = train_with_memory(base, tmp_path, steps=3)
    losses = [r["train/loss"] for r in records]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "fgate" in params["transformer"]["h"]["2"]["attention"]

    # Windowed inference over three windows of a stream equals the training model over the
    # windows as rows of one document (C = 2): memory layers read the earlier windows, FoX
    # layers start afresh in each window as in each training row.
    windows, length = 3, 32
    tokens = np.random.default_rng(0).integers(0, 512, size=(1, windows * length))
    training = FlaxLLaMAForCausalLMModule(with_cross_batch(base, windows - 1))
    expected = np.asarray(training.apply({"params": params}, jnp.asarray(
        tokens.reshape(windows, length))).logits).reshape(1, -1, 512)
    model = WindowedLM(params, base, MemoryOptions(length))
    np.testing.assert_allclose(model.logits(tokens), expected, atol=5e-5)
    # A second, shorter row padded in front: each row is its own stream.
    padded = np.concatenate([tokens, np.concatenate(
        [np.zeros((1, length), np.int64), tokens[:, :-length]], axis=1)])
    mask = np.ones(padded.shape, bool)
    mask[1, :length] = False
    logits = model.logits(padded, mask)
    np.testing.assert_allclose(logits[0], expected[0], atol=5e-5)
    np.testing.assert_allclose(logits[1, length:], expected[0, :-length], atol=5e-5)
