#!/usr/bin/env bash
# "Does FoT work?" experiment 2 (README): long Python files, loss by position and perplexity
# as the memory grows.  Builds the corpus and tokenizer from the installed packages (skipped
# if present), trains the run named by the first argument (fot or range0) through the
# runner, and evaluates it on held-out files longer than 16 windows.  Further arguments go to
# the runner.
# CODE_OUT, CODE_WINDOW, CODE_DATA_ARGS and CODE_EVAL_ARGS change the output folder and the
# arguments of the corpus builder and of the evaluation (the test suite runs a tiny version).
set -euo pipefail
cd "$(dirname "$0")/.."
run=$1
shift
out=${CODE_OUT:-runs/code}
eval_args=${CODE_EVAL_ARGS:---min_length 8193 --max_length 32768 --max_docs 64 --bucket_size 512 --context_windows 1,4,16,64}
[ -f $out/data/code_sp.model ] || python -m experiments.code_corpus --output_dir $out/data ${CODE_DATA_ARGS:-}
python -m running_utils.runner --config configs/code_$run.json \
  --tokenizer.vocab_file=$out/data/code_sp.model \
  --train_dataset.json_dataset.path=$out/data/train.jsonl \
  --eval_dataset.json_dataset.path=$out/data/heldout.jsonl --workdir=$out/$run --resume=false "$@"
checkpoint=$(ls -d $out/$run/*/checkpoints/step_* | sort -V | tail -1)
python -m eval.loss_by_position --load_checkpoint "trainstate::$checkpoint" \
  --tokenizer $out/data/code_sp.model --data $out/data/heldout.jsonl \
  --last_context_length ${CODE_WINDOW:-512} \
  --output_dir $out/eval_$run $eval_args
