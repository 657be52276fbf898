"""Data throughput: the ``doc_aware_k2`` pipeline alone, and tokenization + pipeline through
``JsonDataset`` with 1 and 2 tokenizer processes.

    python -m benchmarks.bench_data [--batch_size 16] [--seq_length 2048] [--vocab_file ...]

Prints a table of tokens per second last.  Pipeline input is pre-tokenized numpy documents
with log-normal lengths (median ~1k tokens, some far longer than a row); the dataset reads
``data/tiny_corpus.jsonl`` repeated into a temporary file, tokenized with the tiny
SentencePiece model unless ``--vocab_file`` names another tokenizer.  Dataset timings start
after the first batch, so they measure the steady state, not the start-up of the pool.
"""
import argparse
import itertools
import os
import tempfile
import time

import numpy as np
from tqdm import tqdm

from EasyLM.data import DatasetFactory
from EasyLM.tokenizer import load_tokenizer
from FoT.data_pipeline import make_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(1000), 1.0, count).astype(int) + 1, 100_000)
    return [(rng.integers(3, 32000, n, dtype=np.int32), np.ones(n, np.float32), f"s{n % 3}")
            for n in lengths]


def timed_batches(iterator, batches, description):
    """Tokens per second over ``batches`` batches after a first, untimed one."""
    batch, _ = next(iterator)
    tokens = 0
    start = time.perf_counter()
    for batch, _ in tqdm(itertools.islice(iterator, batches), total=batches, desc=description):
        tokens += batch["input_tokens"].size
    return tokens / (time.perf_counter() - start)


def bench_pipeline(name, batch_size, seq_length, batches):
    documents = itertools.cycle(random_documents(4000))
    pipeline = make_pipeline(name, documents, batch_size, seq_length)
    return timed_batches(pipeline, batches, f"{name} pipeline")


def bench_json_dataset(path, tokenizer, processes, batch_size, seq_length, batches):
    config = {"type": "json", "json_dataset": {
        "path": path, "batch_size": batch_size, "seq_length": seq_length,
        "data_pipeline": "doc_aware_k2", "tokenizer_processes": processes}}
    dataset = DatasetFactory.load_dataset(config, tokenizer)
    try:
        return timed_batches(iter(dataset), batches, f"JsonDataset, {processes} process(es)")
    finally:
        dataset.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_length", type=int, default=2048)
    parser.add_argument("--pipeline_batches", type=int, default=2000)
    parser.add_argument("--dataset_batches", type=int, default=40)
    parser.add_argument("--vocab_file", default=os.path.join(ROOT, "tokenizers", "tiny_sp.model"))
    args = parser.parse_args()
    shape = (args.batch_size, args.seq_length)
    rows = [("doc_aware_k2 pipeline, pre-tokenized", 0,
             bench_pipeline("doc_aware_k2", *shape, args.pipeline_batches))]
    tokenizer = load_tokenizer({"vocab_file": args.vocab_file})
    with open(os.path.join(ROOT, "data", "tiny_corpus.jsonl")) as f:
        corpus = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.jsonl")
        with open(path, "w") as f:
            f.write(corpus * 20)
        for processes in (1, 2):
            rows.append(("JsonDataset doc_aware_k2 + tokenizer", processes,
                         bench_json_dataset(path, tokenizer, processes, *shape,
                                            args.dataset_batches)))
    print(f"\nbatch {args.batch_size} x seq {args.seq_length}, {os.cpu_count()} CPU cores, "
          f"tokenizer {os.path.basename(args.vocab_file)}")
    print(f"{'what':<40} {'tokenizer processes':>20} {'M tokens/s':>11}")
    for what, processes, rate in rows:
        print(f"{what:<40} {processes or '-':>20} {rate / 1e6:>11.2f}")


if __name__ == "__main__":
    main()
