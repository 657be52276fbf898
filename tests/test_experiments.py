"""The "Does FoT work?" experiments: the dictionary-lookup documents, their evaluation, the
``{tokens:mask}`` field that feeds them to training, the reports, and a tiny CPU run of each
recipe script (``experiments/dictionary_lookup.sh``, ``experiments/code_memory.sh``) end to
end."""
import base64
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from EasyLM.data import DatasetFactory, DocumentError, TextProcessor, process_record
from EasyLM.tokenizer import load_tokenizer
from eval.dictionary_lookup import distractor_prefixes, lookup_accuracy
from experiments import dictionary_data as dd
from experiments import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SP = os.path.join(REPO, "tokenizers", "tiny_sp.model")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def document(seed=0, window=32, num_keys=50, num_values=10, pairs=8):
    return dd.make_document(np.random.default_rng(seed), window, num_keys, num_values, pairs)


# The documents.

def test_vocabulary_puts_keys_then_values_after_the_special_ids():
    keys, values, size = dd.vocabulary(5, 4)
    assert keys.tolist() == [3, 4, 5, 6, 7]
    assert values.tolist() == [8, 9, 10, 11]
    assert size == 12


@pytest.mark.parametrize("seed", range(5))
def test_document_is_a_dictionary_then_lookups_of_its_values(seed):
    window, pairs, num_keys, num_values = 32, 8, 50, 10
    doc = document(seed, window, num_keys, num_values, pairs)
    key_ids, value_ids, _ = dd.vocabulary(num_keys, num_values)
    assert doc.dtype == np.int16 and doc.shape == (2 * window,)
    keys, values = doc[0:2 * pairs:2], doc[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs
    assert np.isin(keys, key_ids).all() and np.isin(values, value_ids).all()
    dictionary = dict(zip(keys.tolist(), values.tolist()))
    for p in range(0, 2 * window, 2):
        assert doc[p] in dictionary, p
        assert doc[p + 1] == dictionary[doc[p]], p
    assert sorted(dd.document_keys(doc).tolist()) == sorted(dictionary)
    # The lookups are drawn, not a fixed pattern.
    assert len(set(doc[2 * pairs::2].tolist())) > 1


def test_loss_mask_marks_exactly_the_values_after_the_dictionary():
    window, pairs = 32, 8
    expected = [int(p >= 2 * pairs and p % 2 == 1) for p in range(2 * window)]
    mask = dd.loss_mask(window, pairs)
    assert mask.dtype == np.uint8 and mask.tolist() == expected
    assert mask.sum() == window - pairs


def far_lookups_by_loop(doc, window):
    marks = np.zeros(len(doc), bool)
    seen = set()
    for p in range(window, 2 * window, 2):
        if doc[p] not in seen:
            seen.add(doc[p])
            marks[p + 1] = True
    return marks


def test_far_lookups_are_the_first_lookup_of_each_key_in_window_b():
    # window 8: A = k3 v9 k4 v8 | k3 v9 k3 v9, B = k4 v8 k4 v8 k3 v9 k4 v8
    doc = np.array([3, 9, 4, 8, 3, 9, 3, 9, 4, 8, 4, 8, 3, 9, 4, 8])
    assert np.flatnonzero(dd.far_lookups(doc, 8)[0]).tolist() == [9, 13]
    window = 32
    docs = np.stack([document(seed, window, num_keys=12, pairs=6) for seed in range(20)])
    marks = dd.far_lookups(docs, window)
    assert marks.shape == docs.shape
    expected = np.stack([far_lookups_by_loop(doc, window) for doc in docs])
    np.testing.assert_array_equal(marks, expected)
    assert (dd.loss_mask(window, 6).astype(bool) | ~marks).all()  # far lookups carry loss


def test_tokens_round_trip_through_base64():
    tokens = [3, 300, 4479, 32000]
    assert dd.decode_tokens(dd.encode_tokens(tokens)).tolist() == tokens
    assert len(base64.b64decode(dd.encode_tokens(tokens))) == 2 * len(tokens)  # int16


def test_written_documents_read_back_with_their_loss_mask(tmp_path):
    path = tmp_path / "docs.jsonl"
    window, pairs = 16, 4
    dd.write_documents(path, 5, seed=3, window=window, num_keys=20, num_values=6, pairs=pairs)
    rng = np.random.default_rng(3)
    expected = np.stack([dd.make_document(rng, window, 20, 6, pairs) for _ in range(5)])
    np.testing.assert_array_equal(dd.read_documents(path, window), expected)
    np.testing.assert_array_equal(dd.read_documents(path, window, max_docs=2), expected[:2])
    for line in path.read_text().splitlines():
        mask = np.frombuffer(base64.b64decode(json.loads(line)["loss_mask"]), np.uint8)
        np.testing.assert_array_equal(mask, dd.loss_mask(window, pairs))
    with pytest.raises(ValueError, match="check --window"):
        dd.read_documents(path, 8)


def test_generator_command_writes_both_splits_and_the_task(tmp_path):
    dd.main(["--output_dir", str(tmp_path), "--window", "16", "--num_keys", "20",
             "--num_values", "6", "--pairs", "4", "--train_docs", "7", "--eval_docs", "3"])
    task = json.loads((tmp_path / "task.json").read_text())
    assert task["vocab_size"] == 3 + 20 + 6
    train = dd.read_documents(tmp_path / "train.jsonl", 16)
    held_out = dd.read_documents(tmp_path / "eval.jsonl", 16)
    assert (len(train), len(held_out)) == (7, 3)
    assert not any((doc == train).all(1).any() for doc in held_out)
    assert max(train.max(), held_out.max()) < task["vocab_size"]


@pytest.mark.parametrize("window, pairs, num_keys", [(31, 4, 20), (16, 8, 20), (16, 0, 20),
                                                     (64, 8, 7)])
def test_impossible_documents_are_refused(window, pairs, num_keys):
    with pytest.raises(ValueError, match="pairs"):
        dd.make_document(np.random.default_rng(0), window, num_keys, 6, pairs)


# The evaluation's distractors and accuracy.

def eval_docs(count=40, window=16, num_keys=64, pairs=4):
    rng = np.random.default_rng(1)
    return np.stack([dd.make_document(rng, window, num_keys, 8, pairs)
                     for _ in range(count)]).astype(np.int32)


@pytest.mark.parametrize("memory_windows", [1, 2, 3, 6])
def test_distractors_are_windows_of_other_documents_without_the_targets_keys(memory_windows):
    window = 16
    docs = eval_docs(window=window)
    prefixes = distractor_prefixes(docs, window, 10, memory_windows, np.random.default_rng(0))
    assert prefixes.shape == (10, (memory_windows - 1) * window)
    windows = docs.reshape(len(docs), 2, window)
    for i, prefix in enumerate(prefixes):
        assert not np.isin(prefix[0::2], dd.document_keys(docs[i])).any()
        for piece in prefix.reshape(-1, window):
            sources = np.flatnonzero((windows == piece).all(-1).any(-1))
            assert len(sources) and i not in sources


def test_too_few_disjoint_documents_is_an_error():
    docs = eval_docs(count=6, num_keys=4)  # every document uses all four keys
    with pytest.raises(ValueError, match="share no key"):
        distractor_prefixes(docs, 16, 3, 2, np.random.default_rng(0))


class FakeModel:
    """``score`` as the evaluated models give it: ``predictions[:, p - 1]`` guesses token ``p``;
    ``guess(batch)`` returns a guess for every position.  Records the batches it saw."""

    def __init__(self, guess):
        self.guess, self.batches = guess, []

    def score(self, tokens):
        self.batches.append(tokens)
        return np.zeros(tokens[:, 1:].shape, np.float32), self.guess(tokens)


def far_positions(batch, window):
    """``[B, N - 1]``: whether prediction ``p - 1`` is of a far lookup's value (token ``p``)."""
    tail = dd.far_lookups(batch[:, -2 * window:], window)
    return np.concatenate([np.zeros((len(batch), batch.shape[1] - 2 * window), bool), tail],
                          1)[:, 1:]


@pytest.mark.parametrize("memory_windows", [1, 3])
def test_accuracy_counts_the_far_lookups_next_token_guesses(memory_windows):
    window = 16
    docs = eval_docs(window=window)
    targets = docs[:len(docs) // 2]

    def accuracy(guess, batch_size=4):
        model = FakeModel(guess)
        value = lookup_accuracy(model, docs, window, memory_windows, batch_size, progress=False)
        seen = np.concatenate(model.batches)
        assert seen.shape == (len(targets), (memory_windows + 1) * window)
        np.testing.assert_array_equal(seen[:, -2 * window:], targets)
        return value

    def only_at_far_lookups(batch):
        return np.where(far_positions(batch, window), batch[:, 1:], -1)

    def everywhere_but_far_lookups(batch):
        return np.where(far_positions(batch, window), -1, batch[:, 1:])

    assert accuracy(lambda batch: batch[:, 1:]) == 1.0
    assert accuracy(lambda batch: batch[:, 1:] + 1) == 0.0
    assert accuracy(lambda batch: batch[:, :-1]) == 0.0  # one position off: the key
    assert accuracy(only_at_far_lookups) == 1.0
    assert accuracy(everywhere_but_far_lookups) == 0.0
    # Right only on even values: the share of far lookups with an even value, in any batching.
    values = targets[dd.far_lookups(targets, window)]
    even = lambda batch: np.where(batch[:, 1:] % 2 == 0, batch[:, 1:], -1)  # noqa: E731
    for batch_size in (3, 20):
        assert accuracy(even, batch_size) == pytest.approx(np.mean(values % 2 == 0))


# The {tokens:mask} field.

class CharTokenizer:
    bos_token_id, eos_token_id, vocab_size = 1, 2, 256

    def encode(self, text):
        return [ord(c) for c in text]


def b64(values, dtype):
    return base64.b64encode(np.asarray(values, dtype).tobytes()).decode()


def process(example, **config):
    config = {"base64_token_dtype": "i2", **config}
    tokens, mask, _ = TextProcessor(config, CharTokenizer())(example)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    return tokens.tolist(), mask.tolist()


EXAMPLE = {"ids": b64([5, 300, 7, 9], np.int16), "m": b64([0, 1, 0, 2], np.uint8), "q": "ab"}


def test_tokens_with_a_mask_field_give_per_token_loss_masks():
    assert process(EXAMPLE, fields="{ids:m}", add_bos_token=False, add_eos_token=False) == (
        [5, 300, 7, 9], [0, 1, 0, 1])
    assert process(EXAMPLE, fields="{ids:m}") == ([1, 5, 300, 7, 9, 2], [0, 0, 1, 0, 1, 1])
    assert process(EXAMPLE, fields="{ids:m}", add_bos_token=False) == (
        [5, 300, 7, 9, 2], [0, 1, 0, 1, 1])
    # A bracketed entry has no loss, whatever its mask says; other entries keep theirs.
    assert process(EXAMPLE, fields="[{ids:m}],{ids:m},[q],{ids}", add_bos_token=False,
                   add_eos_token=False) == (
        [5, 300, 7, 9] * 2 + [97, 98] + [5, 300, 7, 9], [0] * 4 + [0, 1, 0, 1] + [0] * 2 + [1] * 4)


def test_a_bad_mask_field_skips_the_document():
    processor = TextProcessor({"fields": "{ids:m}", "base64_token_dtype": "i2"}, CharTokenizer())
    short = dict(EXAMPLE, m=b64([0, 1, 1], np.uint8))
    with pytest.raises(DocumentError, match="field 'm' has 3 loss-mask entries for 4 tokens"):
        processor(short)
    assert process_record(processor, short) == "field 'm' has 3 loss-mask entries for 4 tokens"
    assert process_record(processor, {"ids": EXAMPLE["ids"]}) == "missing field 'm'"
    assert process_record(processor, {"m": EXAMPLE["m"]}) == "missing field 'ids'"
    assert process_record(processor, dict(EXAMPLE, m="@@")).startswith(
        "field 'm' is not base64 of uint8")


def test_the_pipeline_shifts_each_documents_mask_with_its_targets(tmp_path):
    """doc_aware_k2 rows of L tokens over documents of 2L: each row pair holds one document,
    and loss_masks[p] is the mask of target token p + 1 of the stream."""
    length, rng = 16, np.random.default_rng(0)
    docs = [(rng.integers(3, 400, 2 * length), rng.integers(0, 2, 2 * length))
            for _ in range(12)]
    lines = [json.dumps({"tokens": dd.encode_tokens(t), "loss_mask": dd.encode_tokens(m, np.uint8)})
             for t, m in docs]
    bad = json.dumps({"tokens": dd.encode_tokens(np.full(2 * length, 401)),
                      "loss_mask": dd.encode_tokens(np.ones(5), np.uint8)})
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines[:3] + [bad] + lines[3:]) + "\n")
    dataset = DatasetFactory.load_dataset({
        "type": "json",
        "json_dataset": {"path": str(path), "seq_length": length, "batch_size": 4,
                         "data_pipeline": "doc_aware_k2"},
        "text_processor": {"fields": "{tokens:loss_mask}", "base64_token_dtype": "i2",
                           "add_bos_token": False, "add_eos_token": False}},
        load_tokenizer({"vocab_file": TINY_SP}))
    masks = {tuple(t.tolist()): m for t, m in docs}

    def mask_of(pair):  # a row pair's inputs are exactly one document
        return masks[tuple(pair.reshape(-1).tolist())]

    batches = [item for item, _ in zip(dataset, range(4))]
    assert batches[-1][1]["dataset_skipped_lines"] == 1
    pairs = 0
    for (batch, _), (following, _) in zip(batches, batches[1:]):
        for j in range(0, 4, 2):
            rows = slice(j, j + 2)
            inputs = batch["input_tokens"][rows].reshape(-1)
            # The stream's next document starts this row pair of the next batch.
            next_inputs = following["input_tokens"][rows]
            np.testing.assert_array_equal(batch["target_tokens"][rows].reshape(-1),
                                          np.r_[inputs[1:], next_inputs[0, 0]])
            np.testing.assert_array_equal(batch["loss_masks"][rows].reshape(-1),
                                          np.r_[mask_of(inputs)[1:], mask_of(next_inputs)[0]])
            pairs += 1
    assert pairs == 6


# The reports.

def test_dictionary_report_table_and_figure(tmp_path):
    common = dict(memory_windows=[1, 8], num_test_docs=10, chance=1 / 32)
    paths = []
    for label, with_memory, without in [("fot", [0.5, 0.25], 0.03125), ("base", [0.0625, 0], 0)]:
        paths.append(tmp_path / f"{label}.json")
        paths[-1].write_text(json.dumps(dict(common, label=label, accuracy_with_memory=with_memory,
                                             accuracy_without_memory=without)))
    report.main(["dictionary", "--output_dir", str(tmp_path / "out"), *map(str, paths)])
    assert (tmp_path / "out" / "dictionary_lookup.md").read_text() == (
        "| model | memory 1 | memory 8 | no memory |\n| --- | --- | --- | --- |\n"
        "| fot | 50.0% | 25.0% | 3.1% |\n| base | 6.2% | 0.0% | 0.0% |\n\nChance: 3.12%.\n")
    assert (tmp_path / "out" / "dictionary_lookup.png").read_bytes()[:8] == PNG_MAGIC
    other = json.loads(paths[1].read_text())
    paths[1].write_text(json.dumps(dict(other, memory_windows=[1, 4])))
    with pytest.raises(ValueError, match="different --memory_windows"):
        report.main(["dictionary", "--output_dir", str(tmp_path / "out"), *map(str, paths)])


# The recipes end to end, tiny.

WINDOW = 32  # DICT_WINDOW / CODE_WINDOW of the page's cpu blocks


def read_json(path):
    with open(path) as f:
        return json.load(f)


def page_outputs(docs_page_run, directory):
    """``directory`` (relative, as the page's commands name it) of the checkout where the cpu
    blocks of docs/experiments.md ran: the page's CPU-sized runs of the experiment scripts
    are the runs these tests read."""
    checkout, done = docs_page_run(os.path.join(REPO, "docs", "experiments.md"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return checkout / directory


DOCS_PAGES = ("docs/experiments.md",)  # read through docs_page_run (conftest runs it ahead)
DICT_OUT = "runs/dictionary_cpu"  # as docs/experiments.md's cpu block names them
CODE_OUT = "runs/code_cpu"


@pytest.fixture(scope="module")
def dictionary_run(docs_page_run):
    return page_outputs(docs_page_run, DICT_OUT)


@pytest.mark.slow
def test_dictionary_script_writes_data_evaluations_figures_and_table(dictionary_run):
    out = dictionary_run
    assert read_json(out / "data" / "task.json")["vocab_size"] == 3 + 256 + 32
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 300
    docs = dd.read_documents(out / "data" / "eval.jsonl", WINDOW, 20)
    far = dd.far_lookups(docs[:10], WINDOW).sum()  # the 10 test documents' far lookups
    chance = 1 / len(np.unique(docs[dd.far_lookups(docs, WINDOW)]))
    results = {}
    for name, label, sizes in [("fot", "fot", [1, 2, 4]), ("range0", "range0", [1, 2, 4]),
                               ("fot_hf", "fot (PyTorch export)", [1, 4])]:
        result = results[name] = read_json(out / f"eval_{name}" / "dictionary_lookup.json")
        assert set(result) == {"model", "label", "data", "window", "num_test_docs",
                               "memory_windows", "accuracy_with_memory",
                               "accuracy_without_memory", "chance"}
        assert (result["label"], result["memory_windows"], result["window"],
                result["num_test_docs"]) == (label, sizes, WINDOW, 10)
        assert len(result["accuracy_with_memory"]) == len(sizes)
        assert result["chance"] == pytest.approx(chance)
        for accuracy in result["accuracy_with_memory"] + [result["accuracy_without_memory"]]:
            assert accuracy * far == pytest.approx(round(accuracy * far))  # hits / far lookups
        assert (out / f"eval_{name}" / "dictionary_lookup.png").read_bytes()[:8] == PNG_MAGIC
    # The paths as the page's command gave them, relative to the checkout.
    assert results["fot"]["model"].startswith(f"trainstate::{DICT_OUT}/fot")
    assert results["fot"]["model"].endswith("checkpoints/step_20")
    assert results["fot_hf"]["model"] == f"{DICT_OUT}/hf_fot"
    assert (out / "dictionary_lookup.png").read_bytes()[:8] == PNG_MAGIC
    table = (out / "dictionary_lookup.md").read_text()
    assert "| model | memory 1 | memory 2 | memory 4 | no memory |" in table
    for name in ("fot", "range0"):
        r = results[name]
        cells = [f"{a:.1%}" for a in r["accuracy_with_memory"] + [r["accuracy_without_memory"]]]
        assert f"| {name} | " + " | ".join(cells) + " |" in table.splitlines()
    # The export is the FoT checkpoint: the same accuracies where both were measured.
    jax_fot, torch_fot = results["fot"], results["fot_hf"]
    assert torch_fot["accuracy_with_memory"] == [jax_fot["accuracy_with_memory"][0],
                                                 jax_fot["accuracy_with_memory"][2]]
    assert torch_fot["accuracy_without_memory"] == jax_fot["accuracy_without_memory"]


@pytest.mark.slow
def test_dictionary_export_scores_like_the_checkpoint_with_distractors(dictionary_run):
    """The accuracies of a 20-step model hardly depend on memory; its losses do, so the
    export is compared on them too, on the evaluation's own inputs."""
    from eval.models import TorchWindowedLM, load_model

    out = dictionary_run
    checkpoint = json.loads((out / "eval_fot" / "dictionary_lookup.json").read_text())["model"]
    checkpoint = checkpoint.replace(f"::{DICT_OUT}", f"::{out}")  # relative to the checkout
    jax_model = load_model(checkpoint, last_context_length=WINDOW)
    torch_model = TorchWindowedLM(str(out / "hf_fot"), device="cpu")
    assert torch_model.last_context_length == WINDOW
    docs = dd.read_documents(out / "data" / "eval.jsonl", WINDOW, 20)
    prefixes = distractor_prefixes(docs, WINDOW, 4, 4, np.random.default_rng(0))
    batch = np.concatenate([prefixes, docs[:4]], 1)
    losses = {}
    for name, model in [("jax", jax_model), ("torch", torch_model),
                        ("jax local", jax_model.without_memory()),
                        ("torch local", torch_model.without_memory())]:
        losses[name] = model.score(batch)[0]
    np.testing.assert_allclose(losses["torch"], losses["jax"], atol=1e-4)
    np.testing.assert_allclose(losses["torch local"], losses["jax local"], atol=1e-4)
    # Memory changes the losses past the first window, so the comparison covers it.
    assert np.abs(losses["jax"] - losses["jax local"])[:, WINDOW:].max() > 1e-3


@pytest.fixture(scope="module")
def code_run(docs_page_run):
    return page_outputs(docs_page_run, CODE_OUT)


@pytest.mark.slow
def test_code_corpus_splits_by_package_and_its_tokenizer_round_trips_code(code_run):
    data = code_run / "data"
    corpus = read_json(data / "corpus.json")
    train, held_out = set(corpus["train_packages"]), set(corpus["heldout_packages"])
    assert train and held_out and not train & held_out
    for split, packages, files, chars in [("train", train, "train_files", "train_chars"),
                                          ("heldout", held_out, "heldout_files", "heldout_chars")]:
        records = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        assert {r["package"] for r in records} <= packages
        assert (len(records), sum(len(r["text"]) for r in records)) == (corpus[files],
                                                                       corpus[chars])
    assert 400_000 <= corpus["train_chars"]
    tokenizer = load_tokenizer({"vocab_file": str(data / "code_sp.model")})
    assert tokenizer.vocab_size == 512
    snippet = ("class A:\n    def f(self, x):\n        if x:\n\t\treturn {'a': [1, 2]}\n\n"
               "        return  x  # done\n")
    ids = tokenizer.encode(snippet)
    assert tokenizer.decode(ids) == snippet
    model = spm.SentencePieceProcessor(model_file=str(data / "code_sp.model"))
    newline = model.piece_to_id("\n")
    assert ids.count(newline) == snippet.count("\n")  # one token per newline


@pytest.mark.slow
def test_code_script_measures_loss_by_position_with_limited_memories(code_run, tmp_path):
    from eval.loss_by_position import read_documents

    result = read_json(code_run / "eval_fot" / "loss_by_position.json")
    variants = ["with memory", "without memory", "reads 1 window", "reads 4 windows",
                "reads 16 windows"]
    assert (result["num_docs"], result["last_context_length"], result["bucket_size"]) == (
        4, WINDOW, 32)
    assert result["bucket_starts"] == list(range(0, 512, 32))
    tokenizer = load_tokenizer({"vocab_file": str(code_run / "data" / "code_sp.model")})
    docs = read_documents(code_run / "data" / "heldout.jsonl", tokenizer, "text", 512, 129, 4)
    assert sum(result["tokens_per_bucket"]) == sum(len(doc) - 1 for doc in docs)
    for variant in variants:
        assert len(result[variant.replace(" ", "_")]) == 16
    beyond = result["loss_past_first_window"]
    assert list(beyond) == variants
    for variant in variants:
        assert result["perplexity_past_first_window"][variant] == pytest.approx(
            np.exp(beyond[variant]))
    # A memory limit of 0 is no memory; 16 windows of 32 hold all of 512 tokens.
    assert beyond["reads 1 window"] == pytest.approx(beyond["without memory"], abs=1e-4)
    assert beyond["reads 16 windows"] == pytest.approx(beyond["with memory"], abs=1e-4)
    np.testing.assert_allclose(result["reads_1_window"], result["without_memory"], atol=1e-4)
    np.testing.assert_allclose(result["reads_16_windows"], result["with_memory"], atol=1e-4)
    assert abs(beyond["with memory"] - beyond["without memory"]) > 1e-4  # memory matters
    assert (code_run / "eval_fot" / "loss_by_position.png").read_bytes()[:8] == PNG_MAGIC

    report.main(["code", "--output_dir", str(tmp_path), "--labels", "tiny fot",
                 str(code_run / "eval_fot" / "loss_by_position.json")])
    table = (tmp_path / "code_perplexity.md").read_text()
    ppl = result["perplexity_past_first_window"]
    assert table == ("Perplexity of the tokens past the first window:\n\n"
                     "| model | " + " | ".join(variants) + " |\n|" + " --- |" * 6 + "\n"
                     "| tiny fot | " + " | ".join(f"{ppl[v]:.3f}" for v in variants) + " |\n")
    assert (tmp_path / "code_loss_by_position.png").read_bytes()[:8] == PNG_MAGIC
