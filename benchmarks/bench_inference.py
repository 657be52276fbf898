"""FoT PyTorch inference benchmark: prefill and decode speed and peak memory on long inputs.

    python -m benchmarks.bench_inference                     # 1B-scale model, bf16, CUDA
    python -m benchmarks.bench_inference --lengths 32768 --groupings none,4x1024,1x512
    python -m benchmarks.bench_inference --tiny              # CPU smoke test, seconds

A random :class:`FoT.hf.modeling_fot_llama.FoTLlamaForCausalLM` (default: hidden 2048,
intermediate 5504, 22 layers, 16 heads, memory layers 6, 12, 18, vocab 32000, local window
2048).  For every (input length, memory-layer attention grouping) it times

* prefill: one forward over the random input (windows of ``W`` tokens, earlier windows in
  memory), computing only the last token's logits;
* decode: ``--decode_tokens`` greedy tokens after it, one at a time through the cache (after
  one untimed step, which grows the memory buffer);

and reports ``torch.cuda.max_memory_allocated`` over both (weights included), after a
warm-up on a short input.  First it checks the attention the model runs (SDPA with a
bottom-right causal mask, GQA, grouping) against the explicit float32 softmax on this device
and prints PASS/FAIL.  Memory is the KV memory (linear in the input) plus activations of
one window; grouping bounds the memory-layer attention's working set.  The table is printed
last; ``--json`` also writes the rows.

With ``--framework jax``, ``--attention_type`` sets the family of the layers outside
``--mem_layers`` (for example ``gla`` or ``supra`` with ``--mem_layers ""``: a model whose
context is a recurrent state, whose decoding time and memory should not grow with the
input), as the toolkit's ``attention_type`` does.

    python -m benchmarks.bench_inference --framework jax --attention_type gla --mem_layers "" \
        --lengths 4096,131072
"""
import argparse
import copy
import gc
import json
import time

import torch

from EasyLM.jax_utils import DTYPE_NAMES, dtype_name
from FoT.hf.cache_fot_llama import FoTCache
from FoT.hf.configuration_fot_llama import FoTLlamaConfig
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM, windowed_attention

FULL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
            num_attention_heads=16, mem_layers=[6, 12, 18], vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            mem_layers=[1, 3], vocab_size=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny model, short inputs, float32 on CPU unless --device is given")
    p.add_argument("--lengths", default=None, help="input lengths (default 32768,131072)")
    p.add_argument("--groupings", default=None,
                   help="memory-layer attention groupings HEADSxQUERIES or none "
                        "(default none,4x1024)")
    p.add_argument("--window", type=int, default=None, help="last_context_length (2048)")
    p.add_argument("--kv_heads", type=int, default=None, help="GQA: key/value heads")
    p.add_argument("--decode_tokens", type=int, default=None, help="default 32")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES))
    p.add_argument("--device", default=None)
    p.add_argument("--torch_attention", default="true", choices=("true", "false"))
    p.add_argument("--framework", default="torch", choices=("torch", "jax"),
                   help="the exported PyTorch model or the JAX WindowedLM (run separately: "
                        "JAX preallocates most of the GPU memory)")
    p.add_argument("--batch_sizes", default=None, help="rows decoded together (1,8)")
    p.add_argument("--decode_modes", default="eager,graph",
                   help="PyTorch one-token path: eager pieces and/or the CUDA graph (graph "
                        "rows are checked to generate the eager rows' greedy tokens)")
    p.add_argument("--attention_type", default="softmax",
                   help="--framework jax: the family of the layers outside --mem_layers "
                        "(softmax, forgetting, supra, gla)")
    p.add_argument("--mem_layers", default=None,
                   help="--framework jax: memory layers, comma-separated ('' for none; "
                        "default the model's)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.framework == "torch" and (args.attention_type != "softmax"
                                      or args.mem_layers is not None):
        p.error("--attention_type and --mem_layers go with --framework jax (the PyTorch "
                "export runs its own memory layers)")
    defaults = (dict(lengths="256,1024", groupings="none", window=64, decode_tokens=4,
                     dtype="fp32", device="cpu", batch_sizes="1,2") if args.tiny else
                dict(lengths="32768,131072", groupings="none", window=2048,
                     decode_tokens=32, dtype="bf16", device="cuda", batch_sizes="1,8"))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_grouping(text):
    if text == "none":
        return None
    heads, queries = text.lower().split("x")
    return [int(heads), int(queries)]


def build_model(args):
    sizes = TINY if args.tiny else FULL
    config = FoTLlamaConfig(**sizes, num_key_value_heads=args.kv_heads or
                            sizes["num_attention_heads"], max_position_embeddings=args.window,
                            last_context_length=args.window,
                            torch_attention=args.torch_attention == "true")
    dtype = getattr(torch, dtype_name(args.dtype))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):  # initialise in place: no 4 GB float32 copy on the host
            model = FoTLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def check_attention(args, heads, head_dim):
    """Max error of the SDPA path against the explicit float32 softmax, per case."""
    dtype = getattr(torch, dtype_name(args.dtype))
    window, errors = args.window, {}
    generator = torch.Generator(device=args.device).manual_seed(0)
    for kv_heads in sorted({heads, max(1, heads // 4)}, reverse=True):
        for queries, keys, grouping in [(window, window, None), (window, 3 * window, None),
                                        (window, 3 * window, [max(1, heads // 4), window // 2]),
                                        (1, 3 * window, None)]:
            q = torch.randn(1, heads, queries, head_dim, generator=generator, device=args.device)
            k, v = (torch.randn(1, kv_heads, keys, head_dim, generator=generator,
                                device=args.device) for _ in range(2))
            expected = windowed_attention(q, k, v, None, use_sdpa=False)
            got = windowed_attention(q.to(dtype), k.to(dtype), v.to(dtype), grouping).float()
            name = f"kv{kv_heads} q{queries} k{keys} grouping {grouping}"
            errors[name] = (got - expected).abs().max().item()
    tolerance = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}[args.dtype]
    return errors, max(errors.values()) <= tolerance


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(model, length, batch, grouping, decode_tokens, device, static_decode):
    """Prefill ``batch`` random rows of ``length`` tokens, then ``decode_tokens`` greedy
    steps; ``static_decode`` picks the one-token path (CUDA graph or eager pieces)."""
    model.config.mem_attention_grouping = grouping
    generator = torch.Generator(device=device).manual_seed(length + batch)
    tokens = torch.randint(3, model.config.vocab_size, (batch, length), device=device,
                           generator=generator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cache = FoTCache(model.config, static_decode=static_decode)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        out = model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        generated = [token]
        # Untimed: the first step grows the buffers sized for the prefill (a copy) and, for
        # the CUDA graph, captures it.
        token = model(token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
        generated.append(token)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
            generated.append(token)
        synchronize(device)
        decode = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    return dict(framework="torch", mode="graph" if static_decode else "eager", length=length,
                batch=batch, grouping="x".join(map(str, grouping)) if grouping else "none",
                prefill_s=prefill, prefill_tok_s=batch * length / prefill,
                decode_ms=1e3 * decode / decode_tokens if decode_tokens else None,
                peak_gib=peak, memory_tokens=cache.memory_length,
                tokens=torch.cat(generated, 1).tolist())


def check_greedy(model, args, steps=64):
    """Whether every decode path generates the eager piece path's greedy tokens, in float32
    (in bfloat16 a random model's near-ties flip on rounding): rows of different lengths,
    left-padded, whose local windows move to memory during the steps; for one row, also
    with its whole windows prefilled one at a time (not in chunks)."""
    exact = copy.deepcopy(model).float()
    chunk = exact.config.prefill_chunk_tokens
    window = args.window
    generator = torch.Generator(device=args.device).manual_seed(1)
    results = {}
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        longest = 9 * window + window - steps // 2  # two chunks of 4 windows, then more
        tokens = torch.randint(3, model.config.vocab_size, (batch, longest),
                               device=args.device, generator=generator)
        mask = torch.ones_like(tokens)
        for row in range(batch):
            mask[row, :3 * row] = 0
        if batch == 1:  # a row alone: its prompt is a run of whole windows, prefilled
            mask[:] = 1  # in chunks; compared below with one window at a time
        generated = {}
        modes = args.decode_modes.split(",") + (["window prefill"] if batch == 1 else [])
        with torch.no_grad():
            for mode in modes:
                exact.config.prefill_chunk_tokens = 0 if mode == "window prefill" else chunk
                cache = FoTCache(exact.config, static_decode=mode == "graph")
                out = exact(tokens, attention_mask=mask, past_key_values=cache,
                            logits_to_keep=1)
                token, seq = out.logits.argmax(-1), []
                for _ in range(steps):
                    seq.append(token)
                    token = exact(token, past_key_values=cache, logits_to_keep=1,
                                  attention_mask=torch.ones(batch, 1, device=args.device)
                                  ).logits.argmax(-1)
                generated[mode] = torch.cat(seq, 1).tolist()
        results[f"batch {batch}"] = len({str(v) for v in generated.values()}) == 1
    exact.config.prefill_chunk_tokens = chunk
    del exact
    free(args.device)
    return results


def run_jax_case(model, length, batch, decode_tokens):
    """As :func:`run_case` for :class:`WindowedLM` (JAX): prefill, then one-token steps."""
    import jax
    import numpy as np
    tokens = np.random.default_rng(length + batch).integers(
        3, model.vocab_size, (batch, length)).astype(np.int32)
    capacity = length + decode_tokens + 2
    # Compile for this batch and memory capacity (shapes) outside the timings.
    warm = model.new_state(batch, capacity)
    model.step(warm, tokens[:, :model.last_context_length], last_only=True)
    jax.block_until_ready(model.step(warm, tokens[:, :1], last_only=True))
    del warm
    state = model.new_state(batch, capacity)
    start = time.perf_counter()
    logits = jax.block_until_ready(model.step(state, tokens, last_only=True)[:, -1])
    prefill = time.perf_counter() - start
    # Greedy steps as WindowedLM.generate takes them: tokens chosen and fed back on device.
    token = logits.argmax(-1)[:, None]
    generated = [token]
    token = model.step(state, token, last_only=True)[:, -1].argmax(-1)[:, None]
    generated.append(jax.block_until_ready(token))  # untimed, as torch's
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model.step(state, token, last_only=True)[:, -1].argmax(-1)[:, None]
        generated.append(token)
    jax.block_until_ready(token)
    decode = time.perf_counter() - start
    generated = [np.asarray(t) for t in generated]
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    grouping = model.options.attention_grouping
    return dict(framework="jax", mode="jit", length=length, batch=batch,
                grouping="x".join(map(str, grouping)) if grouping else "none",
                prefill_s=prefill, prefill_tok_s=batch * length / prefill,
                decode_ms=1e3 * decode / decode_tokens if decode_tokens else None,
                peak_gib=peak / 2 ** 30 if peak else None,
                memory_tokens=int(state.memory_length.max()),
                tokens=np.concatenate(generated, 1).tolist())


def build_jax_model(args):
    """A random JAX model of the benchmark's sizes, as :class:`WindowedLM`."""
    import jax
    import jax.numpy as jnp

    from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule, LLaMAConfig
    from EasyLM.models.llama.windowed_lm import WindowedLM
    from FoT.inference import MemoryOptions
    sizes = dict(TINY if args.tiny else FULL)
    mem_layers = sizes["mem_layers"]
    if args.mem_layers is not None:
        mem_layers = [int(x) for x in args.mem_layers.split(",") if x.strip()]
    config = LLaMAConfig(vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"],
                         intermediate_size=sizes["intermediate_size"],
                         num_hidden_layers=sizes["num_hidden_layers"],
                         num_attention_heads=sizes["num_attention_heads"],
                         num_key_value_heads=args.kv_heads or sizes["num_attention_heads"],
                         max_sequence_length=args.window, mem_layers=tuple(mem_layers),
                         attention_type=args.attention_type)
    dtype = jnp.dtype(dtype_name(args.dtype))
    module = FlaxLLaMAForCausalLMModule(config)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    # The first of --groupings: the JAX attention materialises its scores, which over a long
    # memory fit only a few heads and queries at a time.
    grouping = parse_grouping(args.groupings.split(",")[0])
    return WindowedLM(params, config, MemoryOptions(
        args.window, dtype=str(dtype), attention_grouping=tuple(grouping) if grouping else None))


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def format_table(rows, weights_gib):
    header = (f"{'framework':>9} {'mode':>5} {'length':>8} {'batch':>5} {'grouping':>9} "
              f"{'prefill s':>10} {'prefill tok/s':>14} {'decode ms':>10} {'peak GiB':>9} "
              f"{'greedy':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        key = (f"{r['framework']:>9} {r['mode']:>5} {r['length']:>8} {r['batch']:>5} "
               f"{r['grouping']:>9}")
        if "error" in r:
            lines.append(f"{key} {r['error']:>10}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        decode = f"{r['decode_ms']:.2f}" if r["decode_ms"] else "n/a"
        lines.append(f"{key} {r['prefill_s']:>10.2f} {r['prefill_tok_s']:>14.0f} "
                     f"{decode:>10} {peak:>9} {r.get('greedy', ''):>7}")
    lines.append(f"(weights {weights_gib:.2f} GiB; peak includes them; decode ms per step of "
                 f"all rows; greedy: tokens of this path = the eager piece path's)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.framework == "jax":
        return main_jax(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny (CPU) or --device cpu")
    model = build_model(args)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{name}: torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{args.dtype}, window {args.window}, memory layers {model.config.mem_layers}")
    errors, passed = check_attention(args, model.config.num_attention_heads,
                                     model.config.head_dim)
    print(f"attention check {'PASS' if passed else 'FAIL'}: "
          + ", ".join(f"{name}: {err:.1e}" for name, err in errors.items()))
    greedy = check_greedy(model, args)
    print(f"greedy check (float32, left-padded rows, a window moving to memory) "
          f"{'PASS' if all(greedy.values()) else 'FAIL'}: {greedy}")
    # Warm-up at the first length: libraries, kernels, the allocator and cuDNN's plans (one
    # per attention shape, built once per process: the first prefill pays for them).
    first = int(args.lengths.split(",")[0])
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        times = []
        for static in (False, True):
            free(args.device)
            times.append(run_case(model, first, batch, None, 2, args.device, static)
                         ["prefill_s"])
        print(f"warm-up, {batch} x {first} tokens: first prefill {times[0]:.2f} s, "
              f"then {times[1]:.2f} s")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            for grouping in (parse_grouping(g) for g in args.groupings.split(",")):
                eager = None
                for mode in args.decode_modes.split(","):
                    free(args.device)
                    try:
                        row = run_case(model, length, batch, grouping, args.decode_tokens,
                                       args.device, mode == "graph")
                    except torch.cuda.OutOfMemoryError:
                        row = dict(framework="torch", mode=mode, length=length, batch=batch,
                                   error="OOM", grouping="x".join(map(str, grouping))
                                   if grouping else "none")
                    if mode == "eager":
                        eager = row.get("tokens")
                    elif eager is not None and "tokens" in row:
                        same = sum(a == b for x, y in zip(row["tokens"], eager)
                                   for a, b in zip(x, y))
                        row["greedy"] = f"{same}/{sum(len(x) for x in eager)}"
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}),
                          flush=True)
    finish(args, name, weights_gib, rows, dict(attention_check=errors, greedy_check=greedy))


def main_jax(args):
    import jax
    model = build_jax_model(args)
    weights_gib = sum(x.size * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(model.params)) / 2 ** 30
    name = jax.devices()[0].device_kind
    print(f"{name}: jax {jax.__version__}, {args.dtype}, window {args.window}, attention "
          f"{args.attention_type}, memory layers {list(model.config.mem_layers)}")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            try:
                rows.append(run_jax_case(model, length, batch, args.decode_tokens))
            except jax.errors.JaxRuntimeError as error:  # out of memory (or no kernel fits)
                grouping = model.options.attention_grouping
                rows.append(dict(framework="jax", mode="jit", length=length, batch=batch,
                                 error=str(error).split("\n")[0][:80],
                                 grouping="x".join(map(str, grouping)) if grouping
                                 else "none"))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}),
                  flush=True)
    finish(args, name, weights_gib, rows, {})


def finish(args, name, weights_gib, rows, extra):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, dtype=args.dtype, window=args.window,
                           weights_gib=weights_gib, rows=rows, **extra), f, indent=2)
    print(format_table(rows, weights_gib))


if __name__ == "__main__":
    main()
