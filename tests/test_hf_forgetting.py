"""The exported PyTorch model with forgetting-attention (FoX) layers against the JAX model it
was exported from: the training forward on one window and the windowed inference (padded
batches too) in float32, cached generation against greedy decoding by full forwards, the
config and tensors an export writes, and loading the export as remote code and saving it
again.  (lm-eval on a FoX export: tests/test_lm_eval.py.)"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from EasyLM.forgetting import cumulative_log_forget
from EasyLM.models.llama import convert_easylm_to_hf
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.hf import modeling_fot_llama as modeling
from FoT.hf.cache_fot_llama import FoTCache
from FoT.hf.configuration_fot_llama import FoTLlamaConfig
from FoT.hf.forgetting_fot_llama import forgetting_attention as torch_forgetting_attention
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
from FoT.inference import MemoryOptions
from test_forgetting_kernels import STRONG, float64_forward, random_inputs, relative_error
from test_hf_fot import VOCAB, WINDOW, tiny_fot_checkpoint

ATOL = 1e-4
PRO = dict(forgetting_kv_shift=True, forgetting_qk_norm=True, forgetting_output_gate=True)
# FoX layers everywhere (plain, the "Pro" block, RoPE), and FoX beside a memory layer and a
# softmax layer with every switch on.
VARIANTS = {
    "fox": dict(attention_type="forgetting"),
    "fox_pro": dict(attention_type="forgetting", **PRO),
    "fox_rope": dict(attention_type="forgetting", forgetting_use_rope=True),
    "fox_memory": dict(mem_layers=(1,), num_hidden_layers=4, forgetting_use_rope=True,
                       attention_type=["forgetting", "softmax", "softmax", "forgetting"], **PRO),
}


def export_variant(root, name, variants=VARIANTS, **checkpoint_options):
    """``(variables, config, export directory)`` of a random tiny model of ``name`` (an entry
    of ``variants``: its ``LLaMAConfig`` fields, no memory layers unless it says)."""
    architecture = dict(dict(mem_layers=()), **variants[name])
    variables, config, spec = tiny_fot_checkpoint(root / "ckpt", **architecture,
                                                  **checkpoint_options)
    convert_easylm_to_hf.convert(spec, str(root / "export"))
    return variables, config, root / "export"


# Each JAX model takes seconds to build, export and compile: the comparisons run in the full
# suite; the fast lane checks the PyTorch side on its own (test_pieces_...).
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow)
                                        for name in VARIANTS])
def exported(request, tmp_path_factory):
    return export_variant(tmp_path_factory.mktemp(request.param), request.param)


def load(directory, **overrides):
    return FoTLlamaForCausalLM.from_pretrained(directory, **overrides).eval()


def ids_of(rows, length, seed, low=0):
    return np.random.default_rng(seed).integers(low, VOCAB, size=(rows, length))


def test_one_window_equals_the_jax_training_forward(exported):
    variables, config, directory = exported
    tokens = ids_of(2, WINDOW, seed=1)
    expected = FlaxLLaMAForCausalLMModule(config).apply(variables, jnp.asarray(tokens)).logits
    with torch.no_grad():
        ours = load(directory)(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, np.asarray(expected), atol=ATOL)


def test_windowed_logits_equal_jax_windowed_inference(exported):
    # Windows start over in FoX layers (no decay summed, no token to shift from) as in the
    # JAX WindowedLM; rows padded on the left or the right keep their own windows.
    check_windowed_logits(*exported)


def check_windowed_logits(variables, config, directory):
    """The export's logits over two and five windows, and over rows padded on the left and
    the right, equal JAX's ``WindowedLM``'s."""
    model = load(directory)
    jax_model = WindowedLM(variables, config, MemoryOptions(WINDOW))
    tokens = ids_of(3, 5 * WINDOW - 3, seed=2)
    mask = np.ones_like(tokens)
    mask[1, :WINDOW + 3], mask[2, -5:] = 0, 0
    for length in (2 * WINDOW - 3, tokens.shape[1]):
        with torch.no_grad():
            ours = model(torch.tensor(tokens[:, :length])).logits.numpy()
        np.testing.assert_allclose(ours, jax_model.logits(tokens[:, :length]), atol=ATOL,
                                   err_msg=f"length {length}")
    with torch.no_grad():
        ours = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, jax_model.logits(tokens, mask), atol=ATOL)


def greedy_by_full_forwards(model, prompt, new):
    """``new`` greedy tokens after ``prompt`` ``[1, n]``, each from a forward over the whole
    sequence so far (no cache kept between steps)."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, prompt.shape[1]:].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_greedy_full_forwards_and_jax(name, tmp_path):
    check_cached_generation(*export_variant(tmp_path, name, init_scale=20.0, seed=3))


def check_cached_generation(variables, config, directory):
    """Two prompts, left-padded together (token 0 pads), generate with the cache what greedy
    decoding by full forwards gives each alone (decoding crosses window starts at different
    steps in each row), and the longer what JAX's ``WindowedLM`` generates."""
    model = load(directory)
    prompts = [ids_of(1, n, seed=10 + n, low=1) for n in (WINDOW - 3, 2 * WINDOW + 1)]
    new = 2 * WINDOW + 3
    expected = [greedy_by_full_forwards(model, prompt, new) for prompt in prompts]
    longest = max(p.shape[1] for p in prompts)
    ids, mask = np.zeros((2, longest), np.int64), np.zeros((2, longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.shape[1]:], mask[row, longest - prompt.shape[1]:] = prompt, 1
    # No end of sequence: the full forwards may pick the config's EOS token, which a
    # min_new_tokens run would forbid.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        batch = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[:, longest:].numpy()
    for row, tokens in enumerate(expected):
        np.testing.assert_array_equal(batch[row:row + 1], tokens, err_msg=f"row {row}")
    assert len(set(batch.ravel().tolist())) > 5  # real sequences, not one repeated token
    jax_model = WindowedLM(variables, config, MemoryOptions(WINDOW))
    np.testing.assert_array_equal(jax_model.generate(prompts[1], new), expected[1])


def fox_model():
    """A random PyTorch model of FoX layers with every switch, a memory layer and a softmax
    layer (the "fox_memory" variant), its gate biases and norm scales drawn too."""
    config = FoTLlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=WINDOW,
        **{key: list(value) if isinstance(value, tuple) else value
           for key, value in VARIANTS["fox_memory"].items()})
    torch.manual_seed(0)
    model = FoTLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", "bias")) and "self_attn" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


def test_pieces_calls_and_padding_agree_in_pytorch(monkeypatch):
    # Chunked prefill and the static decoding step do not know FoX layers: a model with them
    # runs the piece path, whatever the config asks; an input fed whole, in calls, token by
    # token or padded in a batch gives every token the same logits.
    model = fox_model()
    monkeypatch.setattr(model.config, "prefill_chunk_tokens", 4 * WINDOW)
    monkeypatch.setattr(modeling, "chunk_attention", None)  # a call would fail
    tokens = torch.tensor(ids_of(1, 3 * WINDOW + 2, seed=4))
    cache = FoTCache(model.config, static_decode=True)
    with torch.no_grad():
        whole = model(tokens, past_key_values=cache).logits
        steps = FoTCache(model.config, static_decode=True)
        parts = [model(tokens[:, :WINDOW + 2], past_key_values=steps).logits]
        parts += [model(tokens[:, t:t + 1], past_key_values=steps).logits
                  for t in range(WINDOW + 2, tokens.shape[1])]
        padded = torch.cat([torch.zeros(1, 5, dtype=tokens.dtype), tokens], dim=1)
        mask = (torch.arange(padded.shape[1]) >= 5).long()[None]
        batch = model(torch.cat([padded, padded.roll(-5, 1)]),
                      attention_mask=torch.cat([mask, mask.roll(-5, 1)])).logits
    assert cache.decoder is None and steps.decoder is None
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[0, 5:], whole[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, :-5], whole[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="under torch.no_grad"):
        model(tokens)


@pytest.mark.slow
def test_remote_code_loads_saves_and_reloads(exported, tmp_path):
    # The export's files alone (forgetting_fot_llama.py among them) run the model, and
    # save_pretrained writes a directory that loads again with the same logits.
    _, _, directory = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules")
    model.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.tensor(ids_of(2, 3 * WINDOW - 1, seed=5))
    with torch.no_grad():
        expected = load(directory)(tokens).logits
        torch.testing.assert_close(model(tokens).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(again(tokens).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_writes_the_fox_layers_and_fields(tmp_path):
    # A model with FoX layers and no memory layers is still the FoT class: it runs windows.
    _, config, directory = export_variant(tmp_path / "pro", "fox_pro")
    fields = json.loads((directory / "config.json").read_text())
    assert fields["architectures"] == ["FoTLlamaForCausalLM"] and fields["mem_layers"] == []
    assert fields["attention_type"] == ["forgetting"] * config.num_hidden_layers
    assert (fields["forgetting_kv_shift"], fields["forgetting_use_rope"]) == (True, False)
    assert (directory / "forgetting_fot_llama.py").exists()
    names = {name for name in load(directory).state_dict() if ".layers.0.self_attn." in name}
    assert {name.split("self_attn.")[1] for name in names} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "fgate.weight",
        "fgate.bias", "kshift.weight", "kshift.bias", "vshift.weight", "vshift.bias",
        "q_norm.weight", "k_norm.weight", "o_norm.weight", "ogate.weight"}
    with pytest.raises(SystemExit):  # LlamaForCausalLM cannot run FoX layers
        convert_easylm_to_hf.main(["--load_checkpoint", f"params::{tmp_path / 'pro' / 'ckpt'}",
                                   "--output_dir", str(tmp_path / "plain"), "--no_memory"])
    assert not (tmp_path / "plain").exists()
    # A FoT model without FoX layers is exported as before: no FoX fields at all.
    _, _, spec = tiny_fot_checkpoint(tmp_path / "fot")
    convert_easylm_to_hf.convert(spec, str(tmp_path / "fot_export"))
    fields = json.loads((tmp_path / "fot_export" / "config.json").read_text())
    assert not any(key.startswith(("attention_type", "forgetting")) for key in fields)
    assert load(tmp_path / "fot_export").config.attention_type == ["softmax"] * 3


def test_the_pytorch_attention_keeps_long_contexts_decay_exact():
    """The export's attention takes each pair's decay before it meets the score: along 2,048
    tokens of strong gates (running sums near -2,900) it stays within 1e-6 of float64 maths
    on the same float32 sums, as the JAX reference does."""
    q, k, v, log_f, _ = random_inputs(7, 1, 2048, 2, 1, 32, STRONG)
    c = cumulative_log_forget(log_f)
    heads_first = [torch.from_numpy(np.array(x)).transpose(1, 2) for x in (q, k, v, c)]
    out = torch_forgetting_attention(*heads_first[:3], heads_first[3], heads_first[3])
    got = out.transpose(1, 2).numpy()
    assert relative_error(got, float64_forward(q, k, v, c)) < 1e-6
