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
"""
import argparse
import gc
import json
import time

import torch

from EasyLM.jax_utils import DTYPE_NAMES, dtype_name
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
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    defaults = (dict(lengths="256,1024", groupings="none,2x32", window=64, decode_tokens=4,
                     dtype="fp32", device="cpu") if args.tiny else
                dict(lengths="32768,131072", groupings="none,4x1024", window=2048,
                     decode_tokens=32, dtype="bf16", device="cuda"))
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


def run_case(model, length, grouping, decode_tokens, device):
    model.config.mem_attention_grouping = grouping
    tokens = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        out = model(tokens, use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        # Untimed: the first step grows the memory buffer sized for the prefill (a copy).
        token = model(token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
        synchronize(device)
        decode = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    return dict(length=length, grouping="x".join(map(str, grouping)) if grouping else "none",
                prefill_s=prefill, prefill_tok_s=length / prefill,
                decode_tok_s=decode_tokens / decode if decode_tokens else None, peak_gib=peak,
                memory_tokens=cache.memory_length)


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def format_table(rows, weights_gib):
    header = (f"{'length':>8} {'grouping':>9} {'prefill s':>10} {'prefill tok/s':>14} "
              f"{'decode tok/s':>13} {'peak GiB':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['length']:>8} {r['grouping']:>9} {r['error']:>10}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "n/a"
        lines.append(f"{r['length']:>8} {r['grouping']:>9} {r['prefill_s']:>10.2f} "
                     f"{r['prefill_tok_s']:>14.0f} {decode:>13} {peak:>9}")
    lines.append(f"(weights {weights_gib:.2f} GiB; peak includes them)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny (CPU) or --device cpu")
    model = build_model(args)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{args.dtype}, window {args.window}, memory layers {model.config.mem_layers}")
    errors, passed = check_attention(args, model.config.num_attention_heads,
                                     model.config.head_dim)
    print(f"attention check {'PASS' if passed else 'FAIL'}: "
          + ", ".join(f"{name}: {err:.1e}" for name, err in errors.items()))
    run_case(model, 2 * args.window, None, 2, args.device)  # warm-up: kernels, allocator
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for grouping in (parse_grouping(g) for g in args.groupings.split(",")):
            free(args.device)
            try:
                rows.append(run_case(model, length, grouping, args.decode_tokens, args.device))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(length=length, error="OOM",
                                 grouping="x".join(map(str, grouping)) if grouping else "none"))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, dtype=args.dtype, window=args.window,
                           weights_gib=weights_gib, attention_check=errors, rows=rows), f,
                      indent=2)
    print(format_table(rows, weights_gib))


if __name__ == "__main__":
    main()
