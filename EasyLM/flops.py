"""FLOP accounting: the model FLOPs of a train or eval step, the attention FLOPs of cross-batch
rows, and the peak FLOP/s of a device, for MFU in the training loop and the benchmarks."""
import jax
import numpy as np

from EasyLM.models.llama.attention import attention_family, layer_attention_types
from FoT.slots import allowed_slots

# Dense bf16 peak FLOP/s of one JAX device, matched against ``device.device_kind`` in order.
# TPU v2/v3 expose each TensorCore as a device; later TPUs one device per chip.
PEAK_FLOPS_PER_DEVICE = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12), ("v3", 61.5e12), ("v2", 22.5e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
)


def peak_flops_per_device(device=None):
    """The table's peak for ``device`` (default: the first device), or None if not listed."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS_PER_DEVICE:
        if name.lower() in kind.lower():
            return flops
    return None


def attention_flops(length, heads, head_dim, n_slots):
    """Forward FLOPs of scores and values for rows of ``length`` tokens, row ``b`` using
    ``n_slots[b]`` context slots (FOT_SPEC 2.4): its own slot causal (half the square), every
    key of the other slots visible."""
    half_slot = 2 * length * length * heads * head_dim
    return half_slot * sum(2 * int(n) - 1 for n in n_slots)


def linear_attention_flops(length, heads, head_dim, chunk):
    """Forward FLOPs of chunked linear attention over one row of ``length`` tokens: per token
    and head, reading and writing the ``[D, D]`` state (``4 D^2``) and the causal half of its
    chunk's scores and values (``2 C D``; chunks of ``C`` tokens, at most the row)."""
    return length * heads * (4 * head_dim ** 2 + 2 * min(chunk, length) * head_dim)


def flops_per_step(config, batch_size, seq_length, training=True):
    """Model FLOPs of one step (forward; x3 for forward + backward), written out:

    - matmuls: ``2 * P * B * L`` for ``P`` parameters used in matmuls (all but the input
      embedding lookup; a tied head counts the embedding once; each layer's attention
      projections as its family counts them, e.g. a forgetting layer's gates);
    - attention: :func:`attention_flops` per layer, with one slot per row in ordinary and
      forgetting layers (whose decay adds no matmul) and in memory layers when
      ``cross_batch_range`` is 0; :func:`linear_attention_flops` per row in the layers of a
      recurrent family (``recurrent``: SUPRA, GLA).
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    families = [attention_family(name) for name in layer_attention_types(config)]
    params = sum(family.projection_parameters(config) + 3 * h * i for family in families)
    params += h * v
    local = np.ones(batch_size, np.int32)
    memory = local
    if config.cross_batch_range > 0:
        memory = allowed_slots(batch_size, config.cross_batch_range, config.dataset_packing,
                               config.cross_batch_stepping)
    memory_layers = len(config.mem_layers)
    recurrent = sum(getattr(family, "recurrent", False) for family in families)
    heads, head_dim = config.num_attention_heads, config.head_dim
    attention = ((config.num_hidden_layers - memory_layers - recurrent)
                 * attention_flops(seq_length, heads, head_dim, local)
                 + memory_layers * attention_flops(seq_length, heads, head_dim, memory)
                 + recurrent * batch_size * linear_attention_flops(
                     seq_length, heads, head_dim, config.linear_chunk_size))
    forward = 2 * params * batch_size * seq_length + attention
    return (3 if training else 1) * forward
