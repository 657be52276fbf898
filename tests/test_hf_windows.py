"""The PyTorch FoT model's window rules (FoT/hf/windows_fot_llama.py) against a from-scratch
reference that computes every token's attention from the rule's definition, and causal
consistency: whole = chunked = token by token = prefix = padded batch (float32, 1e-5)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from FoT.hf import modeling_fot_llama as modeling
from FoT.hf import prefill_fot_llama as prefill
from FoT.hf.cache_fot_llama import FoTCache
from FoT.hf.configuration_fot_llama import FoTLlamaConfig
from FoT.hf.decode_fot_llama import StaticDecoder
from FoT.hf.windows_fot_llama import plan_windows
from test_hf_training import VOCAB, WINDOW, tiny_models

TOL = dict(atol=1e-5, rtol=0)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_logits(model, ids, window_start):
    """Logits of ``ids`` ``[N]`` computed token by token from the definition: token ``t``
    attends (one softmax) to tokens ``window_start[t] .. t`` at positions relative to
    ``window_start[t]`` and, in memory layers, to every earlier token with its key at
    position 0 (not rotated).  No cache, no pieces: a check of both."""
    config, inner = model.config, model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    n = len(ids)
    positions = torch.arange(n)[None]
    cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0], sin[0]  # [N, D]

    def rotate(x, pos):  # x [heads, D]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[pos] + rotated * sin[pos]

    hidden = inner.embed_tokens.weight[torch.as_tensor(ids)]
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = rms(hidden, layer.input_layernorm.weight, config.rms_norm_eps)
        q = (x @ attn.q_proj.weight.T).view(n, heads, head_dim)
        k = (x @ attn.k_proj.weight.T).view(n, kv_heads, head_dim)
        v = (x @ attn.v_proj.weight.T).view(n, kv_heads, head_dim)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        memory_layer = index in config.mem_layers
        out = torch.empty(n, heads, head_dim)
        for t in range(n):
            start = window_start[t]
            keys = [rotate(k[j], j - start) for j in range(start, t + 1)]
            values = [v[j] for j in range(start, t + 1)]
            if memory_layer:
                keys = [k[j] for j in range(start)] + keys
                values = [v[j] for j in range(start)] + values
            keys, values = torch.stack(keys, 1), torch.stack(values, 1)  # [heads, S, D]
            query = rotate(q[t], t - start)
            scores = torch.einsum("hd,hsd->hs", query, keys) * head_dim ** -0.5
            out[t] = torch.einsum("hs,hsd->hd", scores.softmax(-1), values)
        hidden = hidden + out.reshape(n, -1) @ attn.o_proj.weight.T
        x = rms(hidden, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        mlp = layer.mlp
        hidden = hidden + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) *
                                        mlp.up_proj(x))
    return model.lm_head(rms(hidden, inner.norm.weight, config.rms_norm_eps))


def aligned_starts(n):
    return [WINDOW * (t // WINDOW) for t in range(n)]


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return tiny_models(mem_layers=(1,), kv_heads=request.param)[2].eval()


def ids_of(length, rows=1, seed=0, low=0):
    return torch.tensor(np.random.default_rng(seed).integers(low, VOCAB, (rows, length)))


def test_plan_windows_rules():
    # aligned: windows at multiples of W of the stream, whatever the calls
    assert plan_windows(0, 20, 8) == [(0, 8, 0), (8, 16, 8), (16, 20, 8)]
    assert plan_windows(5, 1, 8) == [(0, 1, 0)]
    assert plan_windows(8, 1, 8) == [(0, 1, 8)]  # a full window moves to memory whole
    assert plan_windows(3, 12, 8) == [(0, 5, 0), (5, 12, 8)]
    # longllama: the prompt's last W tokens are its final window; memory windows of
    # local_limit tokens before them; then the window grows to local_limit
    assert plan_windows(0, 20, 8, "longllama") == [(0, 8, 0), (8, 12, 8), (12, 20, 4)]
    assert plan_windows(0, 20, 8, "longllama", 16) == [(0, 12, 0), (12, 20, 12)]
    assert plan_windows(15, 1, 8, "longllama", 16) == [(0, 1, 0)]
    assert plan_windows(16, 1, 8, "longllama", 16) == [(0, 1, 16)]
    with pytest.raises(ValueError, match="window_rule"):
        plan_windows(0, 4, 8, "sliding")


def test_aligned_rule_equals_the_definition_and_the_training_model(model):
    ids = ids_of(3 * WINDOW + 5)
    with torch.no_grad():
        ours = model(ids).logits[0]
        expected = reference_logits(model, ids[0].tolist(), aligned_starts(ids.shape[1]))
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.slow
def test_aligned_rule_is_how_training_sees_windows():
    # The cross-batch training model over a document's windows as batch rows (the last
    # row padded: causal rows ignore what follows) gives the same logits.
    variables, config, model = tiny_models(mem_layers=(0, 2))
    length = 3 * WINDOW + 3
    ids = ids_of(4 * WINDOW, seed=1)
    training = FlaxLLaMAForCausalLMModule(config.replace(cross_batch_range=3))
    rows = jnp.asarray(ids.numpy().reshape(4, WINDOW))
    expected = np.asarray(training.apply(variables, rows).logits).reshape(1, -1, VOCAB)
    with torch.no_grad():
        ours = model.eval()(ids[:, :length]).logits.numpy()
    np.testing.assert_allclose(ours, expected[:, :length], atol=1e-5, rtol=0)


def test_whole_chunked_token_by_token_and_prefix_agree(model):
    ids = ids_of(3 * WINDOW + WINDOW // 2, seed=2)
    with torch.no_grad():
        whole = model(ids).logits
        for sizes in ([5, 17, 1, 1, 4], [1] * ids.shape[1], [WINDOW - 1, 2, WINDOW + 3]):
            cache, parts, start = FoTCache(model.config), [], 0
            while start < ids.shape[1]:
                size = sizes[len(parts) % len(sizes)]
                parts.append(model(ids[:, start:start + size], past_key_values=cache).logits)
                start += size
            torch.testing.assert_close(torch.cat(parts, 1), whole, **TOL, msg=str(sizes))
        prefix = model(ids[:, :2 * WINDOW + 3]).logits
    torch.testing.assert_close(prefix, whole[:, :prefix.shape[1]], **TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_different_lengths_equals_each_row_alone(model, side):
    lengths = [5, 2 * WINDOW + 3, 3 * WINDOW + 1, WINDOW]
    longest = max(lengths)
    rows = [ids_of(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(longest - len(row), None) if side == "left" else slice(0, len(row))
        ids[i, columns], mask[i, columns] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, **TOL, msg=f"row {i}")
        if side == "right":  # causal: right padding needs no mask at all
            unmasked = model(ids).logits
            for i, n in enumerate(lengths):
                torch.testing.assert_close(unmasked[i, :n], batch[i, :n], **TOL)


def test_left_padded_generation_equals_each_prompt_alone():
    model = tiny_models(mem_layers=(1,), kv_heads=2)[2].eval()
    for p in model.parameters():  # wide logits: greedy choices cannot flip on float noise
        p.data *= 1.5
    # Token 0 is the padding: generate() masks it wherever it appears in a prompt.
    prompts = [ids_of(n, seed=20 + n, low=1)[0] for n in (3, WINDOW + 2, 2 * WINDOW - 1)]
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt):], mask[i, longest - len(prompt):] = prompt, 1
    new = 2 * WINDOW + 3  # crosses window boundaries at different steps in each row
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
        for i, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)
            assert batch[i, longest:].tolist() == alone[0, len(prompt):].tolist(), i
    assert len(set(batch[:, longest:].flatten().tolist())) > 5


def test_autograd_takes_right_padding_and_refuses_left_padding(model):
    ids = ids_of(2 * WINDOW + 3, rows=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with torch.no_grad():
        expected = model(ids[:1, :-4]).logits
    logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[:1, :-4].detach(), expected, **TOL)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask.flip(1))


def test_longllama_rule_equals_the_definition(model):
    model.config.window_rule, model.config.local_window_limit = "longllama", 2 * WINDOW
    try:
        prompt = 2 * WINDOW + 4  # a memory window of W + 4 tokens, then the last W tokens
        ids = ids_of(prompt + 3 * WINDOW, seed=4)
        cache = FoTCache(model.config)
        with torch.no_grad():
            logits = [model(ids[:, :prompt], past_key_values=cache).logits[0]]
            for t in range(prompt, ids.shape[1]):  # generation: one token per call
                logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits[0])
            # The final window starts at prompt - W and grows to local_window_limit tokens,
            # then moves to memory whole.
            starts = [0] * (prompt - WINDOW) + [prompt - WINDOW] * (2 * WINDOW)
            starts += [prompt + WINDOW] * (ids.shape[1] - len(starts))
            expected = reference_logits(model, ids[0].tolist(), starts)
        torch.testing.assert_close(torch.cat(logits), expected, **TOL)
        # the rule depends on the prompt's length: a shorter prompt cuts elsewhere
        with torch.no_grad():
            shorter = model(ids[:, :prompt - 2]).logits[0]
        assert not torch.allclose(shorter[-4:], expected[prompt - 6:prompt - 2], atol=1e-3)
    finally:
        model.config.window_rule, model.config.local_window_limit = "aligned", None


def test_export_records_the_window_rule(tmp_path):
    from EasyLM.models.llama import convert_easylm_to_hf
    from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
    from test_hf_fot import tiny_fot_checkpoint

    _, _, spec = tiny_fot_checkpoint(tmp_path / "ckpt")
    convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir", str(tmp_path / "o"),
                               "--window_rule", "longllama", "--local_window_limit", "16"])
    model = FoTLlamaForCausalLM.from_pretrained(tmp_path / "o")
    assert (model.config.window_rule, model.config.local_window_limit) == ("longllama", 16)
    assert FoTCache(model.config).local_capacity == 16
    with pytest.raises(SystemExit):  # argparse names the choices
        convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir",
                                   str(tmp_path / "p"), "--window_rule", "sliding"])
    with pytest.raises(Exception, match="local_window_limit .4. must be >= "):
        convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir",
                                   str(tmp_path / "q"), "--local_window_limit", "4"])


def prompt_then_steps(model, ids, mask, prompt, **cache_options):
    """Last logits ``[B, steps + 1, V]`` of ``ids[:, :prompt]`` fed at once, then of each later
    column fed alone (as generation feeds tokens), and the cache."""
    cache = FoTCache(model.config, **cache_options)
    with torch.no_grad():
        logits = [model(ids[:, :prompt], attention_mask=mask[:, :prompt],
                        past_key_values=cache).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                past_key_values=cache).logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("padded", [False, True], ids=["uniform", "left_padded"])
def test_static_decode_steps_equal_the_piece_path(model, padded, monkeypatch):
    # The static one-token step (replayed as a CUDA graph on GPUs) computes what the eager
    # piece path does, across window moves, buffer growth and rows at different lengths.
    ids = ids_of(3 * WINDOW + 2, rows=3, seed=5)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5], mask[1, :WINDOW + 1] = 0, 0
    prompt = WINDOW + 3
    steps = []
    compute = StaticDecoder._compute
    monkeypatch.setattr(StaticDecoder, "_compute",
                        lambda self, hidden: steps.append(1) or compute(self, hidden))
    eager, eager_cache = prompt_then_steps(model, ids, mask, prompt, static_decode=False)
    static, static_cache = prompt_then_steps(model, ids, mask, prompt, static_decode=True)
    assert eager_cache.decoder is None and static_cache.decoder is not None
    torch.testing.assert_close(static, eager, **TOL)
    # most steps (not those where a row's window moves to memory or a buffer grows)
    assert len(steps) >= (ids.shape[1] - prompt) // 2, len(steps)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_on_gpu(model):
    # GPU only (tests/conftest.py): the one-token step captured and replayed as a CUDA graph,
    # across window moves and buffer growth (re-capture), for a left-padded batch.
    gpu = type(model)(model.config).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    ids = ids_of(4 * WINDOW, rows=2, seed=6).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    prompt = WINDOW + 3
    eager, eager_cache = prompt_then_steps(gpu, ids, mask, prompt, static_decode=False)
    # static_decode=None: the default, a CUDA graph on CUDA
    graph, graph_cache = prompt_then_steps(gpu, ids, mask, prompt, static_decode=None)
    assert eager_cache.decoder is None and graph_cache.decoder.graph is not None
    torch.testing.assert_close(graph, eager, atol=1e-4, rtol=0)
    # Generation leaves nothing on the GPU behind it (captures reuse one side stream: each
    # new stream kept a cuBLAS workspace for good).
    del eager_cache, graph_cache
    allocated = torch.cuda.memory_allocated()
    for _ in range(2):
        prompt_then_steps(gpu, ids, mask, prompt, static_decode=None)
    assert torch.cuda.memory_allocated() == allocated


def prefill_then_steps(model, ids, splits, steps=3):
    """Logits of ``ids`` fed in calls of ``splits`` columns, then ``steps`` one-token steps
    (eager), and the cache's final buffers."""
    cache = FoTCache(model.config, static_decode=False)
    with torch.no_grad():
        logits, start = [], 0
        for size in splits:
            logits.append(model(ids[:, start:start + size], past_key_values=cache).logits)
            start += size
        for t in range(start, start + steps):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    memory_layer = cache.layers[model.config.mem_layers[0]]
    used = cache.memory_lengths[0] + cache.local_lengths[0]
    return torch.cat(logits, 1), memory_layer.keys[:, :, :used], cache


@pytest.mark.parametrize("variant", ["sdpa", "exact", "no_positionals", "bf16_memory"])
@pytest.mark.parametrize("rows", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_chunked_prefill_equals_window_by_window(model, variant, rows, monkeypatch):
    # Whole windows go through each layer together (FoT/hf/prefill_fot_llama.py): memory in
    # blocks (one not whole), the chunk's earlier windows and the own window merged by their
    # log-sum-exps.  Same logits, same cache, same next tokens as one window at a time; also
    # after a call that left a window half full.
    monkeypatch.setattr(model.config, "prefill_chunk_tokens", 3 * WINDOW)
    monkeypatch.setattr(prefill, "MEMORY_BLOCK", 2 * WINDOW)
    if variant == "exact":
        monkeypatch.setattr(model.config, "torch_attention", False)
    if variant == "no_positionals":
        monkeypatch.setattr(model.config, "mem_positionals", False)
    tol = TOL
    if variant == "bf16_memory":  # the window path also rounds its local window's keys
        monkeypatch.setattr(model.config, "mem_dtype", "bfloat16")
        tol = dict(atol=2e-2, rtol=0)
    chunks = []
    attention = modeling.chunk_attention
    monkeypatch.setattr(modeling, "chunk_attention",
                        lambda attn, *args: chunks.append(args[-1].windows) or
                        attention(attn, *args))
    ids = ids_of(9 * WINDOW + 5, rows=rows, seed=7)
    splits = [7 * WINDOW + 3, WINDOW + 2, 2 * WINDOW - 3]
    chunked = prefill_then_steps(model, ids, splits[:1])[:2], prefill_then_steps(
        model, ids, splits[1:] + [WINDOW * 6])[:2]
    layers = model.config.num_hidden_layers
    # batch 1: chunks of 3, 3 and 1 windows; batch 2: 1 window each
    expected = [3, 3, 1] if rows == 1 else [1] * 7
    assert chunks[:len(expected) * layers:layers] == expected, chunks
    monkeypatch.setattr(model.config, "prefill_chunk_tokens", 0)  # one window at a time
    chunks.clear()
    reference = prefill_then_steps(model, ids, splits[:1])[:2], prefill_then_steps(
        model, ids, splits[1:] + [WINDOW * 6])[:2]
    assert not chunks
    for got, want in zip(chunked, reference):
        torch.testing.assert_close(got[0], want[0], **tol)  # logits
        torch.testing.assert_close(got[1].float(), want[1].float(), **tol)  # memory keys


@pytest.mark.gpu
def test_chunked_prefill_equals_window_by_window_on_gpu(model, monkeypatch):
    # GPU only: cuDNN in bfloat16 (FlashAttention for a memory block that is not whole
    # windows), the efficient kernel in float32, against one window at a time.
    monkeypatch.setattr(model.config, "prefill_chunk_tokens", 4 * WINDOW)
    monkeypatch.setattr(prefill, "MEMORY_BLOCK", 2 * WINDOW)
    calls = []
    partial = prefill.partial_attention
    monkeypatch.setattr(prefill, "partial_attention", lambda q, *args, **kwargs: calls.append(
        (q.dtype, kwargs.get("steady"))) or partial(q, *args, **kwargs))
    ids = ids_of(11 * WINDOW + 5, seed=8).cuda()
    splits = [11 * WINDOW + 2]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        gpu = type(model)(model.config).to("cuda", dtype).eval()
        gpu.load_state_dict(model.state_dict())
        results[dtype] = prefill_then_steps(gpu, ids, splits)[:2]
    assert {(torch.float32, True), (torch.bfloat16, True)} <= set(calls), set(calls)
    monkeypatch.setattr(model.config, "prefill_chunk_tokens", 0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        gpu = type(model)(model.config).to("cuda", dtype).eval()
        gpu.load_state_dict(model.state_dict())
        want = prefill_then_steps(gpu, ids, splits)[:2]
        for got, expected in zip(results[dtype], want):
            torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=0)


def test_chunk_sizes():
    # tokens per chunk over rows x window, at least one window, at most MAX_CHUNK_WINDOWS
    # (each chunk size's earlier-window shapes cost a cuDNN plan), none for 0
    assert prefill.chunk_windows(8192, 1, 2048) == 4
    assert prefill.chunk_windows(8192, 8, 2048) == 1
    assert prefill.chunk_windows(8192, 1, 128) == prefill.MAX_CHUNK_WINDOWS == 8
    assert prefill.chunk_windows(0, 1, 2048) == 0
    # memory key blocks: whole MEMORY_BLOCKs, then powers of two windows, then a part window
    assert prefill.memory_blocks(0, 2048) == []
    assert prefill.memory_blocks(3 * 32768 + 7 * 2048, 2048) == [
        (0, 32768), (32768, 65536), (65536, 98304), (98304, 98304 + 8192),
        (98304 + 8192, 98304 + 12288), (98304 + 12288, 98304 + 14336)]
    assert prefill.memory_blocks(300, 128) == [(0, 256), (256, 300)]
    sizes = {b - a for m in range(0, 40 * 128, 128) for a, b in prefill.memory_blocks(m, 128)}
    assert sizes == {128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768} & set(range(1, 5121))


def test_prefill_chunk_tokens_must_not_be_negative():
    # (Hugging Face's strict config runs validate_fot when built and wraps its error.)
    with pytest.raises(Exception, match="prefill_chunk_tokens must be >= 0"):
        FoTLlamaConfig(mem_layers=[1], num_hidden_layers=2, prefill_chunk_tokens=-1)


def test_a_dropped_cache_is_freed_at_once(model):
    # The static decoder (held by its cache) refers back to it weakly: no reference cycle,
    # so generation's buffers (GPU memory) go when the cache goes, not at a later collection.
    import gc
    import weakref
    ids = ids_of(WINDOW + 3, seed=9)
    cache = FoTCache(model.config, static_decode=True)
    with torch.no_grad():
        model(ids[:, :-2], past_key_values=cache)
        model(ids[:, -2:-1], past_key_values=cache)
    assert cache.decoder is not None
    gc.disable()
    try:
        buffers = weakref.ref(cache.layers[0].keys)
        del cache
        assert buffers() is None
    finally:
        gc.enable()
