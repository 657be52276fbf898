"""LLaMA model: exact agreement with Hugging Face, conversion both ways, FoT layers, sharding."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from EasyLM.checkpoint import load_llama_config, load_params, save_params
from EasyLM.jax_utils import (get_jax_mesh, match_partition_rules, named_shardings,
                              parse_mesh_dim)
from EasyLM.models.llama import convert_easylm_to_hf, convert_hf_to_easylm
from EasyLM.models.llama.attention.fot_memory import FoTMemoryAttention
from EasyLM.models.llama.llama_model import (STANDARD_CONFIGS, FlaxLLaMAForCausalLMModule,
                                             LLaMAConfig, get_partition_rules, layer_segments,
                                             with_cross_batch)
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_hf_model(path, kv_heads=4, theta=10000.0, tied=False, rope_scaling=None, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rope_theta=theta, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_scaling=rope_scaling)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from 1 so their conversion is really checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


HF_CASES = {
    "mha-theta1e4-untied": dict(kv_heads=4, theta=1e4, tied=False),
    "gqa-theta1e6-tied": dict(kv_heads=2, theta=1e6, tied=True),
    "gqa-theta1e4-untied": dict(kv_heads=1, theta=1e4, tied=False),
    "mha-theta1e6-tied": dict(kv_heads=4, theta=1e6, tied=True),
    "llama3-rope-scaling": dict(kv_heads=2, theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_logits_and_exact_round_trip(tmp_path, case):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "back"
    model = tiny_hf_model(hf_dir, **HF_CASES[case])
    variables, config = convert_hf_to_easylm.convert(str(hf_dir))
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 40))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    ours = FlaxLLaMAForCausalLMModule(config).apply(variables, jnp.asarray(tokens)).logits
    assert np.abs(np.asarray(ours) - expected).max() < 1e-4

    save_params(str(tmp_path / "ckpt"), variables, config)
    convert_easylm_to_hf.convert(f"params::{tmp_path / 'ckpt'}", str(out_dir))
    original = model.state_dict()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out_dir).state_dict()
    assert set(original) == set(reloaded)
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name


@pytest.mark.slow
def test_converter_command_lines_with_memory_layers(tmp_path):
    tiny_hf_model(tmp_path / "hf", kv_heads=2)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "EasyLM.models.llama.convert_hf_to_easylm",
                    "--hf_model", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                    "--mem_layers", "0,2"], check=True, env=env, cwd=REPO)
    config = load_llama_config(str(tmp_path / "ck"))
    assert config.mem_layers == (0, 2) and config.num_key_value_heads == 2
    subprocess.run([sys.executable, "-m", "EasyLM.models.llama.convert_easylm_to_hf",
                    "--load_checkpoint", f"params::{tmp_path / 'ck'}", "--output_dir",
                    str(tmp_path / "out"), "--dtype", "bf16", "--max_shard_size", "60000"],
                   check=True, env=env, cwd=REPO)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unsupported_hf_architecture_fails_clearly(tmp_path):
    tiny_hf_model(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="unsupported Hugging Face architecture"):
        convert_hf_to_easylm.convert(str(tmp_path))


@pytest.mark.slow
def test_memory_layer_with_range_zero_equals_plain_model():
    plain = tiny_config(mem_layers=())
    fot = tiny_config(mem_layers=(0, 2), cross_batch_range=0)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(plain).init(jax.random.PRNGKey(1), tokens)
    a = FlaxLLaMAForCausalLMModule(plain).apply(variables, tokens).logits
    b = FlaxLLaMAForCausalLMModule(fot).apply(variables, tokens).logits
    np.testing.assert_array_equal(a, b)
    c = FlaxLLaMAForCausalLMModule(with_cross_batch(fot, 2, True, 2)).apply(
        variables, tokens).logits
    # Row 0 sees no other row, so its logits are unchanged; later rows do change.
    np.testing.assert_allclose(c[0], a[0], atol=1e-5)
    assert np.abs(np.asarray(c[1:] - a[1:])).max() > 1e-3


@pytest.mark.slow
def test_memory_layer_attention_matches_per_row_loop():
    from test_cross_batch import loop_cross_batch
    config = tiny_config(cross_batch_range=3, cross_batch_stepping=True, dataset_packing=2,
                         rope_theta=1e6)
    attention = FoTMemoryAttention(config)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 32))
    positions = jnp.broadcast_to(jnp.arange(8), (6, 8)) + 5
    variables = attention.init(jax.random.PRNGKey(1), hidden, positions, None)
    ours = attention.apply(variables, hidden, positions, None).hidden
    p = variables["params"]
    q = (hidden @ p["wq"]["kernel"]).reshape(6, 8, 4, 8)
    k = (hidden @ p["wk"]["kernel"]).reshape(6, 8, 2, 8)
    v = (hidden @ p["wv"]["kernel"]).reshape(6, 8, 2, 8)
    expected = loop_cross_batch(q, k, v, positions, 3, True, 2, theta=1e6)
    expected = expected.reshape(6, 8, 32) @ p["wo"]["kernel"]
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def loss_and_grads(config, variables, tokens):
    """A log-softmax loss of the model's logits and its gradient for the parameters."""
    def f(params):
        logits = FlaxLLaMAForCausalLMModule(config).apply(params, tokens).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.value_and_grad(f)(variables)


@pytest.mark.slow
def test_blockwise_model_matches_reference_model():
    ref = tiny_config(cross_batch_range=2, cross_batch_stepping=True, dataset_packing=2)
    blk = ref.replace(scan_cross_batch=True, cross_batch_block_size=8,
                      remat_block="nothing_saveable")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(ref).init(jax.random.PRNGKey(1), tokens)
    (la, ga), (lb, gb) = (loss_and_grads(c, variables, tokens) for c in (ref, blk))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ga, gb)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["", "dots_and_attention_saveable", "nothing_saveable"])
def test_scan_over_layers_matches_unrolled_layers(remat):
    # Memory layers at the start, middle and end: every kind of segment (a memory layer
    # alone, runs of ordinary layers of length 1 and > 1).
    config = tiny_config(num_hidden_layers=6, mem_layers=(0, 3, 5), cross_batch_range=2,
                         cross_batch_stepping=True, dataset_packing=2, num_key_value_heads=2,
                         remat_block=remat)
    assert layer_segments(6, (0, 3, 5)) == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)]
    assert layer_segments(4, ()) == [(0, 4)]
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(1), tokens)
    scanned = config.replace(scan_layers=True)
    # Initialising with scan_layers gives the same per-layer tree.
    assert (jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        FlaxLLaMAForCausalLMModule(scanned).init(jax.random.PRNGKey(1), tokens)))
    (la, ga), (lb, gb) = (loss_and_grads(c, variables, tokens) for c in (config, scanned))
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                           ga, gb)


@pytest.mark.slow
def test_attention_saving_policy_does_not_rerun_the_kernel_forward():
    # Under remat the fused kernel's forward is re-run in the backward pass unless the policy
    # saves its outputs; dots_and_attention_saveable does, with unchanged numbers.
    config = tiny_config(hidden_size=128, num_attention_heads=2, num_hidden_layers=2,
                         mem_layers=(1,), cross_batch_range=1, cross_batch_implementation="pallas")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 128), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config.replace(
        cross_batch_implementation="reference")).init(jax.random.PRNGKey(1), tokens)

    def grad_fn(policy):
        model = FlaxLLaMAForCausalLMModule(config.replace(remat_block=policy))
        return jax.grad(lambda p: jnp.mean(model.apply(p, tokens).logits ** 2))

    def kernel_calls(policy):
        text = str(jax.make_jaxpr(grad_fn(policy))(variables))
        return text.count("pallas_call")

    assert kernel_calls("dots_with_no_batch_dims_saveable") == 4  # fwd, fwd again, dq, dk/dv
    assert kernel_calls("dots_and_attention_saveable") == 3
    a = grad_fn("dots_and_attention_saveable")(variables)
    b = grad_fn("nothing_saveable")(variables)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def sharded_loss_and_grads(config, variables, tokens, mesh_dim):
    model = FlaxLLaMAForCausalLMModule(config)

    def loss_fn(params, batch):
        logits = model.apply(params, batch).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                             batch[..., None], axis=-1))

    step = jax.value_and_grad(loss_fn)
    if mesh_dim is None:
        return jax.jit(step)(variables, tokens)
    mesh = get_jax_mesh(mesh_dim)
    specs = match_partition_rules(get_partition_rules(), variables)
    shardings = named_shardings(mesh, specs)
    with jax.set_mesh(mesh):
        params = jax.device_put(variables, shardings)
        batch = jax.device_put(tokens, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(("dp", "fsdp"))))
        return jax.jit(step, out_shardings=(None, shardings))(params, batch)


@pytest.mark.slow
@pytest.mark.parametrize("flip,scan", [(False, False), (True, False), (False, True)])
def test_sharded_forward_and_gradients_match_single_device(flip, scan):
    assert jax.device_count() == 8
    config = tiny_config(cross_batch_range=2, cross_batch_stepping=True, dataset_packing=2,
                         flip_sharding_in_cross_batch=flip, num_attention_heads=8, vocab_size=64,
                         num_key_value_heads=4, hidden_size=64, scan_layers=scan,
                         num_hidden_layers=5 if scan else 3)  # scan: layers 2-4 are one scan
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 16), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(1), tokens)
    loss, grads = sharded_loss_and_grads(config, variables, tokens, None)
    for mesh_dim in ("2,2,2",) if flip or scan else ("1,-1,1", "2,2,2", "1,2,4"):
        sl, sg = sharded_loss_and_grads(config, variables, tokens, mesh_dim)
        np.testing.assert_allclose(sl, loss, rtol=1e-5, err_msg=mesh_dim)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), sg, grads)


def test_standard_and_file_configs(tmp_path):
    for name in STANDARD_CONFIGS:
        LLaMAConfig.load_config(name)
    fot7 = LLaMAConfig.load_config("7b_FoT")
    assert fot7.mem_layers == (8, 16, 24) and fot7.rope_theta == 1e6
    assert fot7.vocab_size == 32016 and fot7.max_sequence_length == 4096
    assert LLaMAConfig.load_config("3b_FoT").mem_layers == (6, 12, 18)
    assert LLaMAConfig.load_config("debug_fot").mem_layers == (0,)
    config = tiny_config(rope_theta=5e5)
    config.to_json_file(tmp_path / "c.json")
    assert LLaMAConfig.load_config(f"json::{tmp_path / 'c.json'}") == config
    tiny_hf_model(tmp_path / "hf", kv_heads=2, theta=1e6)
    hf = LLaMAConfig.load_config(f"hf::{tmp_path / 'hf'}")
    assert hf.num_key_value_heads == 2 and hf.rope_theta == 1e6 and hf.hidden_size == 64


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"mem_layers \[1, 5\]: indices \[5\] are out of range"):
        tiny_config(mem_layers=(1, 5))
    config = tiny_config(cross_batch_range=1, dataset_packing=2)
    tokens = jnp.zeros((3, 8), jnp.int32)
    with pytest.raises(ValueError, match="not divisible by dataset_packing 2"):
        FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="multiplies to 6 but there are 8 devices"):
        parse_mesh_dim("1,2,3")
    with pytest.raises(ValueError, match="cannot be split"):
        parse_mesh_dim("3,-1,1")
    with pytest.raises(ValueError, match="unknown model config"):
        LLaMAConfig.load_config("8b")
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(FileNotFoundError, match="no params checkpoint"):
        load_params("params::/nonexistent/ckpt")


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_on_gpu():
    config = tiny_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                         mem_layers=())
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 128), 0, 61)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(1), tokens)
    outs = [FlaxLLaMAForCausalLMModule(config.replace(attention_implementation=impl),
                                       dtype=jnp.bfloat16).apply(variables, tokens).logits
            for impl in ("xla", "cudnn")]
    np.testing.assert_allclose(np.asarray(outs[0], np.float32),
                               np.asarray(outs[1], np.float32), atol=5e-2)


def test_auto_cross_batch_choice_respects_kernel_limits(monkeypatch):
    from EasyLM.models.llama import llama_model
    monkeypatch.setattr(llama_model.jax, "default_backend", lambda: "cpu")
    assert llama_model.resolve_cross_batch_implementation(tiny_config(), 64) == "reference"
    monkeypatch.setattr(llama_model.jax, "default_backend", lambda: "gpu")
    kernel_sized = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    assert llama_model.resolve_cross_batch_implementation(kernel_sized, 256) == "pallas"
    # head dim 8 and a length the kernel's tiles do not divide: fall back, do not fail
    assert llama_model.resolve_cross_batch_implementation(tiny_config(), 512) == "blockwise"
    assert llama_model.resolve_cross_batch_implementation(kernel_sized, 600) == "reference"
    forced = kernel_sized.replace(cross_batch_implementation="reference")
    assert llama_model.resolve_cross_batch_implementation(forced, 256) == "reference"


def test_cross_batch_falls_back_in_the_declared_order(monkeypatch):
    from EasyLM.models.llama import llama_model
    resolve = llama_model.resolve_cross_batch_implementation
    monkeypatch.setattr(llama_model.jax, "default_backend", lambda: "gpu")
    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    # The kernel's tiles depend on the dtype: 192 tokens take float32's 64-token tiles but
    # not bfloat16's 128-token ones.
    assert resolve(config, 192, jnp.float32) == "pallas"
    assert resolve(config, 192, jnp.bfloat16) == "blockwise"
    # Padded rows: the kernel takes no bias, whether chosen automatically or explicitly.
    assert resolve(config, 256, padded=True) == "blockwise"
    explicit = config.replace(cross_batch_implementation="pallas")
    assert resolve(explicit, 600) == "pallas"
    assert resolve(explicit, 256, padded=True) == "blockwise"
    assert resolve(explicit, 600, padded=True) == "reference"
    scanned = config.replace(scan_cross_batch=True)
    assert resolve(scanned, 512) == "blockwise"
    assert resolve(scanned, 640) == "pallas"


def test_exported_fot_config_converts_back_with_its_window():
    # FoT exports declare no length limit; converting back must not make that the window.
    hf = dict(LLaMAConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4,
                          mem_layers=(1,)).to_hf_dict(),
              model_type="fot_llama", architectures=["FoTLlamaForCausalLM"],
              max_position_embeddings=2 ** 31 - 1, last_context_length=128)
    assert LLaMAConfig.from_hf_config(hf).max_sequence_length == 128
    assert LLaMAConfig.from_hf_config(dict(hf, model_type="llama", architectures=[
        "LlamaForCausalLM"], max_position_embeddings=4096)).max_sequence_length == 4096
