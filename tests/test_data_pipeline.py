"""Properties of the linear / doc_aware / doc_aware_kN pipelines over random document streams,
their process split, and exact resume in a fresh process."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from FoT.batch import DTYPES, Batch  # noqa: E402
from FoT.data_pipeline import (  # noqa: E402
    DocAwareDataPipeline, KPackingDAPipeline, LinearPipeline, PipelineSpec, dataset_packing_for,
    make_pipeline, parse_pipeline_name)
from helpers import assert_same_batches, batches_after_restore, save_batches  # noqa: E402

SOURCES = ("books", "code", "web")


def random_documents(seed, count=400, long_length=150):
    """Documents whose tokens are unique positive integers, so a token names its document and
    position; lengths include 0, 1, short ones and ones spanning many batches."""
    rng = np.random.default_rng(seed)
    next_token = 1
    documents = []
    for _ in range(count):
        kind = rng.integers(5)
        length = [0, 1, rng.integers(2, 12), rng.integers(12, 40),
                  rng.integers(40, long_length)][kind]
        tokens = np.arange(next_token, next_token + length, dtype=np.int32)
        next_token += length
        mask = rng.integers(0, 2, length).astype(np.float32)
        source = SOURCES[rng.integers(len(SOURCES))]
        # Sources may hand over lists as well as arrays.
        documents.append((tokens.tolist(), mask.tolist(), source) if kind == 2 else
                         (tokens, mask, source))
    return documents


def run_pipeline(name, documents, batch_size, seq_len, batches, process_index=0, process_count=1):
    pipeline = make_pipeline(name, documents, batch_size, seq_len, process_index, process_count)
    return [next(pipeline) for _ in range(batches)]


def document_tables(documents):
    """token -> (document index, position) and token -> loss mask."""
    where, mask_of = {}, {}
    for index, (tokens, mask, _) in enumerate(documents):
        for position, (token, value) in enumerate(zip(tokens, mask)):
            where[int(token)] = (index, position)
            mask_of[int(token)] = float(value)
    return where, mask_of


def slot_streams(batches, packing):
    """Per slot: inputs, targets and masks of all batches laid end to end."""
    inputs = np.stack([b["input_tokens"] for b, _ in batches])  # [n, B, L]
    targets = np.stack([b["target_tokens"] for b, _ in batches])
    masks = np.stack([b["loss_masks"] for b, _ in batches])
    n, rows, length = inputs.shape
    shape = (n, rows // packing, packing * length)

    def per_slot(array):
        return array.reshape(shape).transpose(1, 0, 2).reshape(rows // packing, -1)
    return per_slot(inputs), per_slot(targets), per_slot(masks)


def check_doc_aware(batches, documents, packing, seq_len, pad):
    for batch, _ in batches:
        assert batch["input_tokens"].dtype == np.int32 and batch["loss_masks"].dtype == np.float32
    where, mask_of = document_tables(documents)
    inputs, targets, masks = slot_streams(batches, packing)
    drawn = batches[-1][1]["dataset_example_index"]
    seen = []
    for slot_inputs, slot_targets, slot_masks in zip(inputs, targets, masks):
        # Targets are the inputs shifted by one within the slot's own stream.
        np.testing.assert_array_equal(slot_targets[:-1], slot_inputs[1:])
        stream = np.append(slot_inputs, slot_targets[-1])
        position = 0
        while position < len(stream):
            token = int(stream[position])
            if pad and token == 0:
                position += 1
                continue
            index, offset = where[token]
            assert offset == 0, "a row may only start a document at its first token"
            if pad:
                assert position % (packing * seq_len) == 0, "pad mode starts documents on a row"
            tokens = np.asarray(documents[index][0])
            piece = stream[position:position + len(tokens)]
            np.testing.assert_array_equal(piece, tokens[:len(piece)])
            seen.append(index)
            position += len(tokens)
        for token, value in zip(slot_targets, slot_masks):
            expected = (0.0 if token == 0 or (pad and where[int(token)][1] == 0)
                        else mask_of[int(token)])
            assert value == expected
    assert len(seen) == len(set(seen)), "a document was emitted twice"
    non_empty = {i for i in range(drawn) if len(documents[i][0]) > 0}
    assert set(seen) == non_empty, "a drawn document is missing"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["doc_aware", "doc_aware_k2", "doc_aware_k4", "doc_aware_pad",
                                  "doc_aware_k2_pad"])
def test_doc_aware_properties(seed, name):
    documents = random_documents(seed)
    _, packing, pad = parse_pipeline_name(name)
    batches = run_pipeline(name, documents, batch_size=8, seq_len=8, batches=30)
    for batch, _ in batches:
        assert batch["input_tokens"].shape == (8, 8)
    check_doc_aware(batches, documents, packing, 8, pad)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_reproduces_concatenated_stream(seed):
    documents = random_documents(seed)
    batches = run_pipeline("linear", documents, batch_size=4, seq_len=8, batches=20)
    stream = np.concatenate([np.asarray(d[0], np.int32) for d in documents])
    mask = np.concatenate([np.asarray(d[1], np.float32) for d in documents])
    inputs = np.concatenate([b["input_tokens"].ravel() for b, _ in batches])
    targets = np.concatenate([b["target_tokens"].ravel() for b, _ in batches])
    masks = np.concatenate([b["loss_masks"].ravel() for b, _ in batches])
    np.testing.assert_array_equal(inputs, stream[:len(inputs)])
    np.testing.assert_array_equal(targets, stream[1:len(inputs) + 1])
    np.testing.assert_array_equal(masks, mask[1:len(inputs) + 1])


def test_metrics_count_documents_tokens_and_sources():
    documents = [([5] * 10, [1] * 10, "a"), ([6] * 3, [1] * 3, "b"), ([7] * 30, [1] * 30, "a")]
    batch, metrics = next(LinearPipeline(documents, 2, 4))
    assert metrics == {"dataset_example_index": 1, "dataset_total_tokens": 8,
                       "batch_tokens_per_source/a": 8}
    pipeline = DocAwareDataPipeline(documents, 2, 4)
    _, metrics = next(pipeline)
    # Row 0 holds document 0; row 1 holds document 1 (3 tokens) and then document 2.
    assert metrics == {"dataset_example_index": 3, "dataset_total_tokens": 8,
                       "batch_tokens_per_source/a": 5, "batch_tokens_per_source/b": 3}
    _, metrics = next(pipeline)
    assert metrics == {"dataset_example_index": 3, "dataset_total_tokens": 16,
                       "batch_tokens_per_source/a": 8}


@pytest.mark.parametrize("name,process_count", [("linear", 2), ("linear", 4), ("doc_aware", 4),
                                                ("doc_aware_k2", 2), ("doc_aware_k2_pad", 4)])
def test_process_rows_are_slices_of_the_global_batch(name, process_count):
    documents = random_documents(3)
    global_batches = run_pipeline(name, documents, 8, 4, 25)
    rows = 8 // process_count
    for process_index in range(process_count):
        local = run_pipeline(name, documents, 8, 4, 25, process_index, process_count)
        for (batch, metrics), (expected, expected_metrics) in zip(local, global_batches):
            assert metrics == expected_metrics
            for key, value in batch.items():
                np.testing.assert_array_equal(
                    value, expected[key][process_index * rows:(process_index + 1) * rows])


def test_names_packing_and_errors():
    assert dataset_packing_for("doc_aware_k2") == 2
    assert dataset_packing_for("doc_aware") == dataset_packing_for("linear") == 1
    assert parse_pipeline_name("doc_aware_k3_pad") == ("doc_aware", 3, True)
    for bad in ["doc_awre", "linear_k2", "doc_aware_k0", "doc_aware_kx", ""]:
        with pytest.raises(ValueError, match="unknown data pipeline"):
            dataset_packing_for(bad)
    with pytest.raises(ValueError, match="not divisible"):
        KPackingDAPipeline([], 6, 4, k=4)
    with pytest.raises(ValueError, match="whole groups of 2"):
        KPackingDAPipeline([], 4, 4, k=2, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="not divisible"):
        LinearPipeline([], 6, 4, process_index=0, process_count=4)


RESUME_CASES = [
    ("linear", 1, 0), ("linear", 2, 1), ("doc_aware", 1, 0), ("doc_aware_pad", 1, 0),
    ("doc_aware_k2", 1, 0), ("doc_aware_k2", 2, 1), ("doc_aware_k4_pad", 1, 0),
]


def resume_batches(cases_file, out_file):
    """Child side: restore each saved state and produce the next batches."""
    with open(cases_file) as f:
        cases = json.load(f)
    batches_per_case = []
    for case in cases:
        state = json.loads(case["state"])
        documents = random_documents(case["seed"])[state["docs_drawn"]:]
        pipeline = make_pipeline(case["name"], documents, 8, 4, case["process_index"],
                                 case["process_count"])
        pipeline.set_state(state)
        batches_per_case.append([next(pipeline)[0] for _ in range(case["count"])])
    save_batches(out_file, batches_per_case)


def test_resume_in_new_process(tmp_path):
    saved_after, count = 7, 5
    cases, expected = [], []
    for name, process_count, process_index in RESUME_CASES:
        documents = random_documents(11)
        full = run_pipeline(name, documents, 8, 4, saved_after + count, process_index,
                            process_count)
        pipeline = make_pipeline(name, documents, 8, 4, process_index, process_count)
        for _ in range(saved_after):
            next(pipeline)
        cases.append({"name": name, "seed": 11, "count": count, "process_index": process_index,
                      "process_count": process_count, "state": json.dumps(pipeline.get_state())})
        expected.append(full[saved_after:])
    resumed = batches_after_restore(__file__, cases, tmp_path)
    assert_same_batches(resumed, expected, RESUME_CASES)


def test_restore_rejects_other_layout():
    pipeline = make_pipeline("doc_aware_k2", random_documents(0), 8, 4)
    next(pipeline)
    with pytest.raises(ValueError, match="same pipeline"):
        make_pipeline("doc_aware", random_documents(0), 8, 4).set_state(pipeline.get_state())


if __name__ == "__main__":
    resume_batches(sys.argv[1], sys.argv[2])


ACCEPTED_NAMES = {"linear": ("linear", 1, False), "doc_aware": ("doc_aware", 1, False),
                  "doc_aware_pad": ("doc_aware", 1, True), "doc_aware_k1": ("doc_aware", 1, False),
                  "doc_aware_k2": ("doc_aware", 2, False),
                  "doc_aware_k16_pad": ("doc_aware", 16, True)}
REFUSED_NAMES = ["", "linear_k2", "linear_pad", "linear_k1", "doc_aware_k0", "doc_aware_k02",
                 "doc_aware_kx", "doc_aware_k", "doc_aware_pad_k2", "doc_awre", "Doc_aware",
                 " doc_aware", "doc_aware\n", "doc_aware_k2_pad_pad", None]


@pytest.mark.parametrize("name", sorted(ACCEPTED_NAMES))
def test_a_pipeline_name_is_read_into_its_spec(name):
    spec = parse_pipeline_name(name)
    assert isinstance(spec, PipelineSpec)
    assert (spec.kind, spec.packing, spec.pad) == ACCEPTED_NAMES[name]
    assert dataset_packing_for(name) == spec.packing
    # The spec selects the pipeline its name selects.
    by_spec, by_name = (make_pipeline(x, random_documents(1), 16, 4) for x in (spec, name))
    assert by_spec.get_state() == by_name.get_state()
    for _ in range(3):
        (batch, metrics), (expected, expected_metrics) = next(by_spec), next(by_name)
        assert metrics == expected_metrics
        for got, want in zip(batch, expected):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_a_pipeline_name_outside_the_grammar_is_refused_listing_the_names(name):
    with pytest.raises(ValueError, match=r"unknown data pipeline .*expected 'linear', "
                                         r"'doc_aware', 'doc_aware_kN'"):
        parse_pipeline_name(name)


@pytest.mark.parametrize("name", ["linear", "doc_aware", "doc_aware_k2_pad"])
def test_every_pipeline_yields_the_batch_type_the_trainer_reads(name):
    batch, _ = next(make_pipeline(name, random_documents(2), 8, 4))
    assert isinstance(batch, Batch) and tuple(batch.keys()) == Batch._fields
    assert [value.dtype for value in batch] == list(DTYPES)
    assert all(value.shape == (8, 4) for value in batch)
    assert batch["loss_masks"] is batch.loss_masks
    with pytest.raises(KeyError, match="'masks' is not a batch field"):
        batch["masks"]  # noqa: B018
    assert all(a is b for a, b in zip(Batch.from_mapping(dict(batch.items())), batch))


def test_a_batch_without_a_field_or_of_two_shapes_is_refused_naming_it():
    tokens = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="the batch lacks loss_masks: a batch holds "
                                         "input_tokens, target_tokens, loss_masks"):
        Batch.from_mapping({"input_tokens": tokens, "target_tokens": tokens})
    with pytest.raises(ValueError, match=r"one \[rows, seq_len\] shape.*'loss_masks': \(2, 3\)"):
        Batch.from_mapping({"input_tokens": tokens, "target_tokens": tokens,
                            "loss_masks": np.zeros((2, 3), np.float32)})
