"""The collective audit of a compiled program (benchmarks.collectives), and the train step's
audit on 8 fake devices: parameters are gathered and gradients reduced, activations are never
gathered along the batch."""
import jax
import pytest

from benchmarks.collectives import (batch_all_gathers, collectives, format_table, summary,
                                    train_step_collectives)
from EasyLM.jax_utils import get_jax_mesh
from EasyLM.models.llama.llama_model import LLaMAConfig
from EasyLM.optimizers import get_default_config as optimizer_config
from EasyLM.trainer import Trainer

# A GPU program's asynchronous collectives and a CPU program's synchronous ones.
HLO = "\n".join([
    '  %ag = (f32[2,32,64]{2,1,0}, f32[16,32,64]{2,1,0}) all-gather-start('
    'f32[2,32,64]{2,1,0} %x), dimensions={0}, metadata={op_name="jit(step)/embed"}',
    "  %agd = f32[16,32,64]{2,1,0} all-gather-done("
    "(f32[2,32,64]{2,1,0}, f32[16,32,64]{2,1,0}) %ag)",
    "  %w = bf16[64,128]{1,0} all-gather(bf16[8,128]{1,0} %p), channel_id=2, dimensions={0}",
    "  %r = f32[64,128]{1,0} all-reduce(f32[64,128]{1,0} %g), to_apply=%add",
    "  %cp = f32[2,32,1,64]{3,2,1,0} collective-permute(f32[2,32,1,64]{3,2,1,0} %k), "
    "source_target_pairs={{0,1}}",
])


def test_reads_kinds_shapes_and_bytes():
    entries = collectives(HLO)
    assert [(e["kind"], e["shape"], e["bytes"]) for e in entries] == [
        ("all-gather", (16, 32, 64), 16 * 32 * 64 * 4), ("all-gather", (64, 128), 64 * 128 * 2),
        ("all-reduce", (64, 128), 64 * 128 * 4), ("collective-permute", (2, 32, 1, 64), 16384)]
    assert entries[0]["op_name"] == "jit(step)/embed" and entries[0]["gather_dim"] == 0
    assert summary(entries)["all-gather"] == (2, 16 * 32 * 64 * 4 + 64 * 128 * 2)
    assert [e["shape"] for e in batch_all_gathers(entries, 16, 32)] == [(16, 32, 64)]
    table = format_table(entries, "example")
    assert "| all-gather | f32 | [16, 32, 64] | 1 | 128.0 KiB | 128.0 KiB |" in table
    assert "| collective-permute | 1 | 16.0 KiB |" in table


ROWS, LENGTH = 16, 32


@pytest.mark.slow
@pytest.mark.parametrize("mesh_dim,updates", [
    ("1,-1,1", {}), ("2,2,2", {}), ("8,1,1", {}), ("1,2,4", {}),
    ("2,2,2", dict(remat_block="nothing_saveable")),
    # The fused kernel (interpreted here) with 2 heads of 64.
    ("1,-1,1", dict(cross_batch_implementation="pallas", num_attention_heads=2)),
])
def test_train_step_gathers_no_activation_along_the_batch(mesh_dim, updates):
    # Sizes chosen apart from 16 rows and 16 * 32 tokens, so that no parameter matches.
    config = LLaMAConfig(**dict(dict(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, mem_layers=(1,), cross_batch_range=3, cross_batch_stepping=True,
        dataset_packing=2), **updates))
    mesh = get_jax_mesh(mesh_dim)
    trainer = Trainer(mesh, config, optimizer_config(), "fp32")
    with jax.set_mesh(mesh):
        entries = train_step_collectives(trainer, ROWS, LENGTH)
    table = format_table(entries, mesh_dim)
    assert not batch_all_gathers(entries, ROWS, LENGTH), table
    kinds = summary(entries)
    if mesh_dim != "8,1,1":  # FSDP and tensor parallelism gather parameters
        assert "all-gather" in kinds, table
    # The memory layer's halo: C = 3 rows of keys and values, forward and backward.
    assert "collective-permute" in kinds, table


@pytest.mark.slow
def test_bench_train_prints_the_collectives_of_a_mesh(capsys):
    from benchmarks import bench_train
    status = bench_train.main([
        "--model", "debug_fot", "--mem-layers", "1", "--vocab-size", "384", "--length", "32",
        "--parts", "collectives", "--mesh", "2,2,2", "--cases", "fast:C=2,batch=8"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "on mesh 2,2,2 (8 x cpu)" in printed and "| collective-permute |" in printed
    assert "all-gathers of activations along the batch: 0" in printed
