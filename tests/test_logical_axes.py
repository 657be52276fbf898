"""Sharding by logical axes (FoT.logical_axes): the table gives the model the layouts it has
always had, and the cross-batch attention reads its axes from the same table."""
import pytest
from jax.sharding import PartitionSpec as PS

from EasyLM.jax_utils import BATCH_AXES, MESH_AXES
from EasyLM.models.llama.llama_model import get_partition_rules
from FoT.logical_axes import LOGICAL_AXIS_RULES, logical_spec, mesh_axes


def test_parameters_and_activations_keep_their_layouts():
    assert get_partition_rules() == (
        ("transformer/wte/embedding", PS("mp", "fsdp")),
        ("attention/(wq|wk|wv)/kernel", PS("fsdp", "mp")),
        ("attention/wo/kernel", PS("mp", "fsdp")),
        ("feed_forward/(w1|w3)/kernel", PS("fsdp", "mp")),
        ("feed_forward/w2/kernel", PS("mp", "fsdp")),
        ("(attention_norm|ffn_norm|ln_f)/kernel", PS(None)),
        ("lm_head/kernel", PS("fsdp", "mp")),
        ("attention/(fgate|kshift|vshift)/kernel", PS("fsdp", None)),
        ("attention/(fgate|kshift|vshift)/bias", PS(None)),
        ("attention/ogate/kernel", PS("fsdp", "mp")),
        ("attention/(q_norm|k_norm|o_norm)/kernel", PS(None)),
        ("attention/(feature_map|key_feature_map)/(kernel|bias)", PS(None)),
        ("attention/gate_down/kernel", PS("fsdp", None)),
        ("attention/gate_up/(kernel|bias)", PS(None)),
    )
    assert logical_spec("batch", "length", "heads", "head_dim") == PS(("dp", "fsdp"), None,
                                                                      "mp", None)
    assert logical_spec("batch", "length", "kv_heads", "head_dim") == PS(("dp", "fsdp"), None,
                                                                         "mp", None)
    assert logical_spec("batch", "length", "activation_embed") == PS(("dp", "fsdp"), None, None)
    assert logical_spec("batch", "length", "mlp") == PS(("dp", "fsdp"), None, "mp")
    assert logical_spec("vocab", "activation_embed") == PS("mp", None)
    assert BATCH_AXES == ("dp", "fsdp") and MESH_AXES == ("dp", "fsdp", "mp")


def test_every_rule_names_mesh_axes_and_unknown_names_fail():
    for name, axes in LOGICAL_AXIS_RULES.items():
        named = () if axes is None else (axes,) if isinstance(axes, str) else axes
        assert set(named) <= set(MESH_AXES), name
    with pytest.raises(KeyError, match="unknown logical axis 'embedding'"):
        mesh_axes("embedding")
