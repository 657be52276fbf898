"""lm-evaluation-harness on the exported PyTorch FoT model (trust_remote_code), with memory
layers only and with forgetting-attention (FoX) layers beside them: the tiny local tasks of
tests/lm_eval_task (log-likelihood multiple choice, rolling perplexity, greedy generation)
give the same per-sample results at batch size 4 as at batch size 1.

lm-eval is an optional extra (requirements-eval.txt): without it the file is skipped.  It is
reached through ``pytest.importorskip`` only, never an import statement, so it is no import of
the project (tests/test_requirements.py)."""
import math
import os

import numpy as np
import pytest
import torch
import transformers

from EasyLM.models.llama import convert_easylm_to_hf
from test_hf_fot import TINY_SP, tiny_fot_checkpoint

evaluator = pytest.importorskip("lm_eval.evaluator")
lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")

pytestmark = pytest.mark.slow  # an export and lm-eval runs of a PyTorch model

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_task")
TASKS = ["fot_tiny_mc", "fot_tiny_ppl", "fot_tiny_gen"]
ATOL = 1e-5  # log-likelihood sums of up to ~190 tokens in float32


# The FoT model, one whose other layers are FoX layers with every switch on, and one whose
# other layers are linear attention (SUPRA, GLA).
ARCHITECTURES = {
    "fot": {},
    "fox": dict(attention_type="forgetting", forgetting_kv_shift=True, forgetting_qk_norm=True,
                forgetting_output_gate=True),
    "linear": dict(attention_type=["supra", "softmax", "gla"]),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def export_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lm_eval_{request.param}")
    _, _, spec = tiny_fot_checkpoint(root / "ckpt", vocab_size=512,
                                     **ARCHITECTURES[request.param])
    convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir", str(root / "fot"),
                               "--tokenizer_path", TINY_SP, "--last_context_length", "16"])
    return str(root / "fot")


@pytest.fixture(scope="module")
def run(export_dir):
    """``run(task, batch_size)``: the per-sample records of one task, ``{doc_id: record}``,
    computed once.  The model is loaded once per batch size, by name as the CLI loads it.  The
    tasks read their JSONL files themselves (tests/lm_eval_task/docs.py): nothing is
    downloaded."""
    task_manager = lm_eval_tasks.TaskManager(include_path=TASK_DIR)
    models, done = {}, {}

    def evaluate(task, batch_size):
        if (task, batch_size) not in done:
            if batch_size not in models:
                models[batch_size] = lm_eval_hf.HFLM(
                    pretrained=export_dir, trust_remote_code=True, dtype="float32",
                    device="cpu", batch_size=batch_size)
            results = evaluator.simple_evaluate(
                model=models[batch_size], tasks=[task], task_manager=task_manager,
                log_samples=True, bootstrap_iters=0)
            done[task, batch_size] = ({s["doc_id"]: s for s in results["samples"][task]},
                                      results["results"][task])
        return done[task, batch_size]

    return evaluate


def _responses(record):
    """A sample's filtered responses as plain values: floats for log-likelihoods, ``bool``
    for is-greedy, strings for generations (lm-eval logs the numbers as strings)."""
    def value(x):
        if isinstance(x, (list, tuple)):
            return [value(y) for y in x]
        if isinstance(x, bool):
            return x
        if x in ("True", "False"):
            return x == "True"
        try:
            return float(x)
        except (TypeError, ValueError):
            return x
    return value(record["filtered_resps"])


def _differences(ones, fours):
    """Lines ``doc N: batch 1 ... != batch 4 ...`` for the samples whose responses differ."""
    lines = []
    for doc_id in sorted(ones):
        a, b = _responses(ones[doc_id]), _responses(fours[doc_id])
        flat_a, flat_b = np.array(a, dtype=object).ravel(), np.array(b, dtype=object).ravel()
        same = flat_a.shape == flat_b.shape and all(
            abs(x - y) <= ATOL if isinstance(x, float) and isinstance(y, float) else x == y
            for x, y in zip(flat_a, flat_b))
        if not same:
            lines.append(f"doc {doc_id}: batch 1 {a!r} != batch 4 {b!r}")
    return lines


def test_batch_one_runs_every_task_end_to_end(run):
    for task in TASKS:
        samples, metrics = run(task, 1)
        assert len(samples) >= 6, task
        assert all(not isinstance(v, float) or math.isfinite(v) for k, v in metrics.items()
                   if "stderr" not in k), (task, metrics)
    ppl = run("fot_tiny_ppl", 1)[1]
    assert 1 < ppl["byte_perplexity,none"] < 512


def test_rolling_loglikelihood_is_the_models_own_at_batch_one(run, export_dir):
    """lm-eval's rolling log-likelihood of a document (one window: the config's
    max_position_embeddings is unbounded) is the sum over its tokens, as the tokenizer encodes
    it by default (BOS first, as LLaMA tokenizers do), of the model's log-probabilities given
    the prefix token (BOS) and the tokens before: the call path is the plain one."""
    samples, _ = run("fot_tiny_ppl", 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    for doc_id, record in samples.items():
        ids = tokenizer(record["doc"]["text"]).input_ids
        assert ids[0] == tokenizer.bos_token_id
        inputs = torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits[0].double(), -1)
        expected = logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        np.testing.assert_allclose(_responses(record)[0], expected, atol=1e-3,
                                   err_msg=f"doc {doc_id}")


@pytest.mark.parametrize("task", TASKS)
def test_batch_four_equals_batch_one(run, task):
    ones, metrics_one = run(task, 1)
    fours, metrics_four = run(task, 4)
    assert sorted(ones) == sorted(fours)
    diff = _differences(ones, fours)
    assert not diff, f"{task}: per-sample results at batch 4 differ from batch 1:\n" + "\n".join(
        diff)
    for name, value in metrics_one.items():
        if isinstance(value, float) and "stderr" not in name:
            assert metrics_four[name] == pytest.approx(value, abs=1e-6, rel=1e-6), (task, name)
