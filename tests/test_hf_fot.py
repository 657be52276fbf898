"""The exported PyTorch FoT model: same logits and tokens as the JAX windowed inference, plain
LLaMA equality on one window, loading with trust_remote_code in a fresh process."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from EasyLM.checkpoint import save_params
from EasyLM.models.llama import convert_easylm_to_hf
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.hf.cache_fot_llama import FoTCache
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
from FoT.inference import MemoryOptions
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SP = os.path.join(REPO, "tokenizers", "tiny_sp.model")
WINDOW = 8
VOCAB = 61


def tiny_fot_checkpoint(path, kv_heads=2, mem_layers=(1,), vocab_size=VOCAB, seed=0,
                        init_scale=1.0, **architecture):
    """A random 3-layer FoT model built in JAX and saved as ``params::path``.

    ``init_scale`` widens the random weights so that logits have clear maxima (greedy
    decoding then cannot flip on float noise between frameworks).  ``architecture``: more
    ``LLaMAConfig`` fields, e.g. forgetting-attention or linear layers, whose gate biases,
    per-head norm scales and feature maps (initialised to 0, 1 and the identity) are drawn
    at random, so that an exporter that drops or misplaces them is seen.
    """
    config = tiny_config(vocab_size=vocab_size, num_key_value_heads=kv_heads,
                         max_sequence_length=WINDOW, mem_layers=mem_layers, rms_norm_eps=1e-5,
                         initializer_range=0.02 * init_scale, **architecture)
    tokens = jnp.zeros((1, WINDOW), jnp.int32)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(seed), tokens)
    variables = _randomise_gates_and_norms(variables, np.random.default_rng(seed))
    save_params(str(path), variables, config)
    return variables, config, f"params::{path}"


def _randomise_gates_and_norms(variables, rng):
    """``variables`` with every bias and norm scale inside an attention drawn around its
    initial value (an attention of a LLaMA layer has neither: nothing changes there)."""
    def draw(path, x):
        names = [str(getattr(key, "key", key)) for key in path]
        inside = "attention" in names and names[-1] in ("bias", "kernel") and (
            names[-1] == "bias" or names[-2].endswith(("norm", "feature_map")))
        return x + rng.normal(0, 0.5, x.shape).astype(x.dtype) if inside else x
    return jax.tree_util.tree_map_with_path(draw, variables)


# GQA exports run in the full suite; the fast lane has them in tests/test_hf_windows.py.
@pytest.fixture(scope="module", params=[4, pytest.param(2, marks=pytest.mark.slow)],
                ids=["mha", "gqa"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fot_kv{request.param}")
    variables, config, spec = tiny_fot_checkpoint(root / "ckpt", kv_heads=request.param)
    convert_easylm_to_hf.convert(spec, str(root / "fot"))
    return variables, config, root


@pytest.mark.parametrize("use_memory", [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=["memory", "no_memory"])
def test_pytorch_logits_equal_jax_windowed_inference(exported, use_memory):
    variables, config, root = exported
    overrides = {} if use_memory else {"mem_layers": []}
    model = FoTLlamaForCausalLM.from_pretrained(root / "fot", **overrides).eval()
    assert model.config.last_context_length == WINDOW  # default: max_sequence_length
    jax_model = WindowedLM(variables, config, MemoryOptions(WINDOW, use_memory=use_memory))
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 5 * WINDOW))
    # 1 window, 2 windows (the last partial), 5 full windows.
    for length in (WINDOW, 2 * WINDOW - 3, 5 * WINDOW):
        with torch.no_grad():
            ours = model(torch.tensor(tokens[:, :length])).logits.numpy()
        np.testing.assert_allclose(ours, jax_model.logits(tokens[:, :length]), atol=1e-4,
                                   err_msg=f"length {length}")
    if not use_memory:  # memory layers without memory are ordinary layers, as mem_layers=[]
        fot = FoTLlamaForCausalLM.from_pretrained(root / "fot").eval()
        with torch.no_grad():
            disabled = fot(torch.tensor(tokens), past_key_values=FoTCache(fot.config, False))
            np.testing.assert_allclose(disabled.logits.numpy(),
                                       model(torch.tensor(tokens)).logits.numpy(), atol=1e-5)


def test_single_window_equals_plain_llama_export(exported):
    _, _, root = exported
    convert_easylm_to_hf.main(["--load_checkpoint", f"params::{root / 'ckpt'}",
                               "--output_dir", str(root / "plain"), "--no_memory"])
    plain = transformers.LlamaForCausalLM.from_pretrained(root / "plain").eval()
    fot = FoTLlamaForCausalLM.from_pretrained(root / "fot").eval()
    assert type(plain) is transformers.LlamaForCausalLM
    tokens = torch.tensor(np.random.default_rng(2).integers(0, VOCAB, size=(2, WINDOW)))
    with torch.no_grad():
        for length in (3, WINDOW):
            np.testing.assert_allclose(fot(tokens[:, :length]).logits.numpy(),
                                       plain(tokens[:, :length]).logits.numpy(), atol=1e-5)


@pytest.mark.slow
def test_greedy_generation_matches_jax(tmp_path):
    variables, config, spec = tiny_fot_checkpoint(tmp_path / "ckpt", init_scale=20.0, seed=3)
    convert_easylm_to_hf.convert(spec, str(tmp_path / "fot"))
    model = FoTLlamaForCausalLM.from_pretrained(tmp_path / "fot").eval()
    prompt = np.random.default_rng(3).integers(3, VOCAB, size=(1, 2 * WINDOW - 3))
    new = 3 * WINDOW  # long enough for the sliding local window to push tokens into memory
    with torch.no_grad():
        ours = model.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)[:, prompt.shape[1]:].numpy()
    theirs = WindowedLM(variables, config, MemoryOptions(WINDOW)).generate(prompt, new)
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(ours[0].tolist())) > 3  # a real sequence, not one repeated token


def test_attention_grouping_and_reference_attention_change_nothing(exported):
    _, _, root = exported
    model = FoTLlamaForCausalLM.from_pretrained(root / "fot").eval()
    tokens = torch.tensor(np.random.default_rng(4).integers(0, VOCAB, size=(2, 5 * WINDOW - 2)))
    with torch.no_grad():
        expected = model(tokens).logits
        for grouping, sdpa in [((1, 3), True), ((3, 2), True), ((2, 5), False), (None, False)]:
            model.config.mem_attention_grouping, model.config.torch_attention = grouping, sdpa
            torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=0)


def test_window_chunks_through_the_cache_equal_one_call_and_memory_is_linear(exported):
    _, _, root = exported
    model = FoTLlamaForCausalLM.from_pretrained(root / "fot").eval()
    tokens = torch.tensor(np.random.default_rng(5).integers(0, VOCAB, size=(1, 6 * WINDOW - 3)))
    cache = FoTCache(model.config)
    with torch.no_grad():
        whole = model(tokens, past_key_values=cache).logits
        chunked_cache = FoTCache(model.config)
        chunks = [model(tokens[:, i:i + WINDOW], past_key_values=chunked_cache).logits
                  for i in range(0, tokens.shape[1], WINDOW)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=1e-5, rtol=0)
    # The last window is partial: 5 full windows went to memory.
    local = tokens.shape[1] - 5 * WINDOW
    assert (cache.local_length, cache.memory_length) == (local, 5 * WINDOW)
    memory_layer, local_layer = cache.layers[1], cache.layers[0]
    # reserved once: all tokens, and a window of room for generation
    assert memory_layer.keys.shape[2] == tokens.shape[1] + WINDOW
    assert local_layer.keys.shape[2] == WINDOW and cache.get_seq_length() == tokens.shape[1]


def test_half_precision_and_memory_dtype(exported):
    _, _, root = exported
    tokens = torch.tensor(np.random.default_rng(6).integers(0, VOCAB, size=(1, 3 * WINDOW)))
    with torch.no_grad():
        expected = FoTLlamaForCausalLM.from_pretrained(root / "fot").eval()(tokens).logits
        for dtype, mem_dtype in [(torch.bfloat16, None), (torch.float16, None),
                                 (torch.float32, "bfloat16")]:
            model = FoTLlamaForCausalLM.from_pretrained(root / "fot", dtype=dtype,
                                                        mem_dtype=mem_dtype).eval()
            logits = model(tokens).logits
            assert logits.dtype == dtype
            torch.testing.assert_close(logits.float(), expected, atol=3e-2, rtol=0)


@pytest.mark.slow
def test_trust_remote_code_in_fresh_process(tmp_path):
    _, _, spec = tiny_fot_checkpoint(tmp_path / "ckpt", vocab_size=512)
    out = tmp_path / "export"
    convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir", str(out),
                               "--tokenizer_path", TINY_SP, "--last_context_length", "16",
                               "--mem_attention_grouping", "2,4", "--dtype", "bf16"])
    script = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert not any("FoT" in m for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tokenizer("The grass is green. " * 8, return_tensors="pt").input_ids
out = model(ids, use_cache=True)
new = model.generate(ids, max_new_tokens=3, do_sample=False)
grouping = "x".join(map(str, model.config.mem_attention_grouping))
print(type(model).__name__, grouping, model.dtype, ids.shape[1],
      out.past_key_values.memory_length, new.shape[1] - ids.shape[1])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name, grouping, dtype, length, memory, generated = result.stdout.split()[-6:]
    assert name == "FoTLlamaForCausalLM" and grouping == "2x4"
    assert dtype == "torch.bfloat16" and int(length) > 16 and int(generated) == 3
    assert int(memory) > 0
