"""The models an evaluation runs, behind one small interface (``token_losses``, ``score``,
``generate``, ``last_context_length``, ``without_memory``): a toolkit checkpoint through the
JAX windowed inference (:class:`~EasyLM.models.llama.windowed_lm.WindowedLM`) or an exported
Hugging Face directory through PyTorch (:class:`TorchWindowedLM`); and the command-line flags
that choose one, shared by the scripts of ``eval/``.
"""
import copy
import json
import os

import numpy as np

from EasyLM import cli
from EasyLM.jax_utils import dtype_name
from EasyLM.models.llama.windowed_lm import WindowedLM
from EasyLM.tokenizer import load_tokenizer
from running_utils.runner_utils import apply_gpu_memory_fraction


class TorchWindowedLM:
    """An exported Hugging Face directory (FoT or plain LLaMA) behind :class:`WindowedLM`'s
    evaluation interface."""

    def __init__(self, model_dir, use_memory=True, dtype="fp32", device=None, **config_overrides):
        # torch and transformers only when a PyTorch model is asked for: the JAX evaluations
        # do not need them installed.
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        torch_dtype = getattr(torch, dtype_name(dtype))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with open(os.path.join(model_dir, "config.json")) as f:
            is_fot = json.load(f).get("model_type") == "fot_llama"
        if is_fot:  # the toolkit's own copy of the model code: no remote code to trust
            from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
            self.model = FoTLlamaForCausalLM.from_pretrained(model_dir, dtype=torch_dtype,
                                                             **config_overrides)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.is_fot, self.use_memory = is_fot, use_memory
        self.vocab_size = self.model.config.vocab_size
        self.last_context_length = (self.model.config.last_context_length if is_fot
                                    else self.model.config.max_position_embeddings)

    def without_memory(self):
        twin = copy.copy(self)
        twin.use_memory = False
        return twin

    def _cache(self):
        if not self.is_fot:
            return None
        from FoT.hf.cache_fot_llama import FoTCache
        return FoTCache(self.model.config, use_memory=self.use_memory)

    def token_losses(self, tokens):
        return self.score(tokens)[0]

    def score(self, tokens):
        """As :meth:`WindowedLM.score`."""
        torch = self.torch
        tokens = torch.as_tensor(np.atleast_2d(tokens), device=self.device)
        # Window-sized chunks through the cache give the same pieces as one call, without
        # materialising the logits of the whole input.
        chunk = self.last_context_length if self.is_fot else tokens.shape[1]
        cache, losses, predictions = self._cache(), [], []
        with torch.no_grad():
            for start in range(0, tokens.shape[1] - 1, chunk):
                targets = tokens[:, start + 1:start + chunk + 1]
                out = self.model(tokens[:, start:start + chunk], past_key_values=cache,
                                 use_cache=cache is not None)
                logits = out.logits[:, :targets.shape[1]].float()
                losses.append(torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), targets.long(), reduction="none").cpu().numpy())
                predictions.append(logits.argmax(-1).int().cpu().numpy())
        return np.concatenate(losses, axis=1), np.concatenate(predictions, axis=1)

    def generate(self, prompt, max_new_tokens, eos_token_id=None):
        torch = self.torch
        prompt = torch.as_tensor(np.atleast_2d(prompt), device=self.device)
        with torch.no_grad():
            out = self.model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                      past_key_values=self._cache(), eos_token_id=eos_token_id,
                                      pad_token_id=eos_token_id if eos_token_id is not None
                                      else 0, attention_mask=torch.ones_like(prompt))
        return out[:, prompt.shape[1]:].cpu().numpy()


def load_model(load_checkpoint=None, hf_model=None, last_context_length=None, use_memory=True,
               attention_grouping=None, dtype="fp32", mem_dtype=None):
    """A :class:`WindowedLM` (JAX checkpoint) or :class:`TorchWindowedLM` (HF directory)."""
    if (load_checkpoint is None) == (hf_model is None):
        raise ValueError("give exactly one of load_checkpoint (a toolkit checkpoint directory) "
                         "and hf_model (an exported directory)")
    if hf_model is not None:
        overrides = {k: v for k, v in dict(last_context_length=last_context_length,
                                           mem_attention_grouping=attention_grouping,
                                           mem_dtype=mem_dtype).items() if v is not None}
        return TorchWindowedLM(hf_model, use_memory, dtype, **overrides)
    jax_dtype = dtype_name(dtype)
    return WindowedLM.from_checkpoint(load_checkpoint, last_context_length,
                                      use_memory=use_memory, attention_grouping=attention_grouping,
                                      mem_dtype=mem_dtype, dtype=jax_dtype)


def add_model_arguments(parser):
    """Command-line flags choosing the model of an evaluation (see :func:`model_from_args`)."""
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--load_checkpoint", default=None,
                        help="toolkit checkpoint directory (JAX): a run's "
                             "RUN/checkpoints/step_<N> or a converted model, optionally "
                             "prefixed params:: or trainstate::; needs --tokenizer")
    source.add_argument("--hf_model", default=None, help="exported Hugging Face directory")
    group.add_argument("--tokenizer", default=None,
                       help="SentencePiece .model, tokenizer.json or HF tokenizer directory "
                            "(default with --hf_model: the one in that directory)")
    group.add_argument("--last_context_length", type=cli.integer(1), default=None,
                       help="local window in tokens (default: the training row length of "
                            "a run's checkpoint, else the model's max_sequence_length; with "
                            "--hf_model, its config's last_context_length)")
    group.add_argument("--mem_attention_grouping", default=None,
                       type=cli.number_list(int, count=2, low=1),
                       help="HEADS,QUERIES processed at a time in memory layers")
    group.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    group.add_argument("--mem_dtype", default=None, choices=("float32", "bfloat16", "float16"))
    group.add_argument("--gpu_memory_fraction", type=cli.fraction, default=None,
                       help="share of each GPU's memory JAX takes (default: JAX's 0.75); "
                            "lower it to evaluate beside another job on the same GPU. "
                            "XLA_PYTHON_CLIENT_MEM_FRACTION in the environment wins, as with "
                            "the runner")


def model_from_args(args, use_memory=True):
    """``(model, tokenizer)`` from the flags of :func:`add_model_arguments`; the tokenizer has
    the interface of :mod:`EasyLM.tokenizer` and adds no BOS itself (see :func:`encode`).
    Flags that cannot work raise :class:`~EasyLM.cli.UsageError` before anything is loaded,
    and so do files that turn out unreadable."""
    tokenizer = tokenizer_from_args(args)
    return load_model_from_args(args, use_memory), tokenizer


def tokenizer_from_args(args):
    """The tokenizer of :func:`model_from_args`, once every model flag is checked: what an
    evaluation reads its data with before it loads the model."""
    flag, path = _checked_model_arguments(args)
    with cli.reading(flag, path):
        return load_tokenizer({"vocab_file": path})


def load_model_from_args(args, use_memory=True):
    """The model of :func:`model_from_args`, its flags checked by :func:`tokenizer_from_args`."""
    flag = "--hf_model" if args.hf_model else "--load_checkpoint"
    with cli.reading(flag, args.hf_model or args.load_checkpoint):
        return load_model(args.load_checkpoint, args.hf_model, args.last_context_length,
                          use_memory, args.mem_attention_grouping, args.dtype, args.mem_dtype)


def _checked_model_arguments(args):
    """``(flag, path)`` of the tokenizer, once the model and tokenizer flags are checked; sets
    the GPU memory share before anything starts JAX's backend."""
    apply_gpu_memory_fraction(getattr(args, "gpu_memory_fraction", None))
    if args.load_checkpoint is not None:
        cli.checkpoint_argument("--load_checkpoint", args.load_checkpoint)
        if args.tokenizer is None:
            raise cli.UsageError("--load_checkpoint needs --tokenizer: the tokenizer the model "
                                 "was trained with (its run's tokenizer.vocab_file)")
    else:
        cli.hf_model_directory("--hf_model", args.hf_model)
    if args.tokenizer is not None:
        return "--tokenizer", cli.input_path("--tokenizer", args.tokenizer)
    tokenizer = _tokenizer_file(args.hf_model)
    if tokenizer is None:
        raise cli.UsageError(f"--hf_model: {args.hf_model} holds no tokenizer (tokenizer.model, "
                             f"tokenizer.json or tokenizer_config.json); pass --tokenizer")
    return "--hf_model", tokenizer


def _tokenizer_file(model_dir):
    # A file rather than the directory: AutoTokenizer would read the config of an exported FoT
    # model, whose AutoConfig is remote code, and ask whether to trust it.
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        return model_dir
    return None


def encode(tokenizer, text, bos=True):
    """Token ids of ``text``, after BOS when ``bos`` and the model's tokenizer starts texts
    with one (``prepends_bos`` of :mod:`EasyLM.tokenizer`): a LLaMA prompt starts with BOS, a
    SmolLM2 one does not, however the tokenizer was read (``--tokenizer DIR``,
    ``tokenizer.json``, an export)."""
    ids = list(tokenizer.encode(text))
    if bos and tokenizer.prepends_bos:
        ids = [tokenizer.bos_token_id] + ids
    return ids
