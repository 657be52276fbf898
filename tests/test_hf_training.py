"""Training the exported PyTorch FoT model on inputs of many windows: plain loops in float32
and bfloat16, gradients against the JAX training model (cross-batch attention over the
windows as batch rows), activation checkpointing, and transformers.Trainer's gradient
accumulation (``num_items_in_batch``)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from EasyLM.models.llama.hf_layout import native_to_hf
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from FoT.hf import fot_config_dict
from FoT.hf.configuration_fot_llama import FoTLlamaConfig
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
from helpers import tiny_config

WINDOW = 8
VOCAB = 61


def tiny_models(mem_layers=(0, 2), kv_heads=4, **memory_options):
    """A random 3-layer FoT model in JAX and the same weights as a PyTorch FoT model.

    With as many key/value heads as query heads (no GQA copy), attention saves the memory
    tensors themselves for backward: what an in-place memory breaks."""
    config = tiny_config(vocab_size=VOCAB, num_key_value_heads=kv_heads,
                         max_sequence_length=WINDOW, mem_layers=mem_layers, rms_norm_eps=1e-5,
                         initializer_range=0.1)
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, WINDOW), jnp.int32))
    fields = fot_config_dict(config.to_hf_dict(), mem_layers, WINDOW, **memory_options)
    fields = {k: v for k, v in fields.items()
              if k not in ("architectures", "model_type", "auto_map")}
    model = FoTLlamaForCausalLM(FoTLlamaConfig(**fields))
    state = {name: torch.tensor(np.asarray(value, np.float32))
             for name, value in native_to_hf(variables["params"], config)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied, if so
    return variables, config, model


def tokens(rows, windows, seed=0):
    return torch.tensor(np.random.default_rng(seed).integers(0, VOCAB, (rows, windows * WINDOW)))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_plain_loop_trains_on_five_windows(dtype, kv_heads):
    # The memory used to be written in place, into tensors that the previous windows'
    # attention saved for backward: backward failed past two windows.
    _, _, model = tiny_models(kv_heads=kv_heads)
    model = model.to(getattr(torch, dtype)).train()
    ids = tokens(2, 5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_bfloat16_memory_gradients_are_close_to_float32():
    ids = tokens(2, 4, seed=2)
    _, exact = loss_and_grads(tiny_models()[2], ids)
    _, rounded = loss_and_grads(tiny_models(mem_dtype="bfloat16")[2], ids)
    for name, grad in exact.items():
        torch.testing.assert_close(rounded[name], grad, atol=2e-3, rtol=0, msg=name)


def test_training_keeps_the_inference_logits_and_inference_memory_in_place():
    _, _, model = tiny_models()
    ids = tokens(2, 4)
    with torch.no_grad():
        expected = model(ids)
    assert expected.past_key_values.layers[0].keys.shape[2] == 5 * WINDOW  # preallocated
    trained = model(ids)  # autograd on: the memory is concatenated, not written in place
    layer = trained.past_key_values.layers[0]
    assert layer.memory_keys.shape[2] == 3 * WINDOW and layer.memory_keys.requires_grad
    torch.testing.assert_close(trained.logits.detach(), expected.logits, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_gradients_equal_jax_cross_batch_training_model(kv_heads):
    # Window-aligned input: the windows of one document as batch rows, each attending to all
    # earlier rows (cross_batch_range = windows - 1) is the PyTorch model's memory.  The loss
    # is the PyTorch one over the whole sequence (window boundaries included).
    windows = 3
    variables, config, model = tiny_models(kv_heads=kv_heads)
    ids = tokens(1, windows, seed=3)
    loss, grads = loss_and_grads(model, ids)

    training = FlaxLLaMAForCausalLMModule(config.replace(cross_batch_range=windows - 1))
    rows = jnp.asarray(ids.numpy().reshape(windows, WINDOW))
    flat = jnp.asarray(ids.numpy())

    def jax_loss(params):
        logits = training.apply({"params": params}, rows).logits.reshape(1, -1, VOCAB)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                               flat[:, 1:]).mean()

    expected_loss, expected_grads = jax.value_and_grad(jax_loss)(variables["params"])
    np.testing.assert_allclose(loss.item(), float(expected_loss), rtol=1e-5)
    expected = dict(native_to_hf(expected_grads, config))
    assert set(expected) == set(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad.numpy(), np.asarray(expected[name]), atol=2e-5,
                                   rtol=1e-3, err_msg=name)
    # Gradients flow from later windows through the memory into the keys of earlier ones:
    # without memory, the gradients differ.
    _, _, no_memory = tiny_models(mem_layers=(), kv_heads=kv_heads)
    _, plain = loss_and_grads(no_memory, ids)
    assert not torch.allclose(plain["model.layers.0.self_attn.k_proj.weight"],
                              grads["model.layers.0.self_attn.k_proj.weight"], atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(reentrant):
    _, _, model = tiny_models(mem_attention_grouping=(1, 3))
    model.train()
    ids = tokens(2, 5, seed=1)
    loss, grads = loss_and_grads(model, ids)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed_loss, checkpointed = loss_and_grads(model, ids)
    hook.remove()
    assert len(calls) == 2 * 5  # every window's layer ran again in backward
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_num_items_in_batch_makes_the_loss_a_sum():
    _, _, model = tiny_models()
    ids = tokens(2, 3)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        mean = model(ids, labels=labels).loss
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    counted = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed * 100, mean * counted)


@pytest.mark.slow
def test_trainer_gradient_accumulation_reports_the_same_loss(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = tokens(4, 3, seed=5)
            self.ids[1, :20] = self.ids[3, 4:] = 0  # rows of different content

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def train(batch, accumulation, checkpointing=False):
        _, _, model = tiny_models()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch}_{accumulation}_{checkpointing}"),
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
            max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
            activation_checkpointing=checkpointing, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Rows())
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        return [(entry["loss"], entry["grad_norm"]) for entry in logs]

    whole = train(2, 1)
    accumulated = train(1, 2)
    assert len(whole) == len(accumulated) == 2
    np.testing.assert_allclose(accumulated, whole, rtol=1e-4)
    np.testing.assert_allclose(train(1, 2, checkpointing=True), whole, rtol=1e-4)


@pytest.mark.slow
def test_peft_lora_trains_five_windows_with_trainer_accumulation_and_checkpointing(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    _, _, model = tiny_models()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]))
    ids = tokens(4, 5, seed=6)  # 5 windows per row: memory carried through 4 window moves

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    args = TrainingArguments(
        output_dir=str(tmp_path / "lora"), per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=5, learning_rate=3e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        activation_checkpointing=True, disable_tqdm=True)
    trainer = Trainer(model=lora, args=args, train_dataset=Rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and np.isfinite(losses).all() and losses[-1] < losses[0], losses
    trained = dict(lora.named_parameters())
    adapters = [name for name in trained if "lora_" in name]
    assert adapters and all(trained[name].requires_grad for name in adapters)
    assert any(not torch.equal(trained[name], torch.zeros_like(trained[name]))
               for name in adapters if "lora_B" in name)  # B starts at zero
    for name, value in base.items():  # the base model is frozen
        peft_name = next(n for n in trained if n.endswith(name.replace(".weight", ".base_layer"
                                                                       ".weight")) or
                         n.endswith(name))
        torch.testing.assert_close(trained[peft_name].detach(), value, atol=0, rtol=0)
