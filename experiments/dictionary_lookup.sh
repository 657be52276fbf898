#!/usr/bin/env bash
# "Does FoT work?" experiment 1 (README): dictionary lookup with distractors.
# Data, the FoT and range-0 runs through the runner, the evaluations (JAX checkpoint and the
# exported PyTorch model), and the side-by-side figure and table.  Extra arguments go to both
# runner calls (e.g. --total_steps=200 for a quick look); DICT_OUT, DICT_WINDOW,
# DICT_DATA_ARGS, DICT_EVAL_ARGS and DICT_HF_EVAL_ARGS change the output folder, the window and the arguments
# of the data generator and of the evaluations (the test suite runs a tiny version).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DICT_OUT:-runs/dictionary}
window=${DICT_WINDOW:-256}
python -m experiments.dictionary_data --output_dir $out/data --window $window ${DICT_DATA_ARGS:-}
eval_args=${DICT_EVAL_ARGS:-}
last_checkpoint() { ls -d "$1"/*/checkpoints/step_* | sort -V | tail -1; }
for run in fot range0; do
  python -m running_utils.runner --config configs/dictionary_lookup_$run.json \
    --train_dataset.json_dataset.path=$out/data/train.jsonl \
    --eval_dataset.json_dataset.path=$out/data/eval.jsonl --workdir=$out/$run --resume=false "$@"
  python -m eval.dictionary_lookup --label "$run" \
    --load_checkpoint "trainstate::$(last_checkpoint $out/$run)" \
    --tokenizer tokenizers/tiny_sp.model --last_context_length $window \
    --data $out/data/eval.jsonl --output_dir $out/eval_$run $eval_args
done
# The FoT model once more, exported to Hugging Face / PyTorch.
rm -rf $out/hf_fot
python -m EasyLM.models.llama.convert_easylm_to_hf \
  --load_checkpoint "trainstate::$(last_checkpoint $out/fot)" --output_dir $out/hf_fot \
  --tokenizer_path tokenizers/tiny_sp.model --last_context_length $window
python -m eval.dictionary_lookup --label "fot (PyTorch export)" --hf_model $out/hf_fot \
  --data $out/data/eval.jsonl --output_dir $out/eval_fot_hf $eval_args \
  ${DICT_HF_EVAL_ARGS:---memory_windows 1,8,64}
python -m experiments.report dictionary --output_dir $out \
  $out/eval_fot/dictionary_lookup.json $out/eval_range0/dictionary_lookup.json
