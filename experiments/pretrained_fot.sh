#!/usr/bin/env bash
# Extending a pretrained model's context (README): SmolLM2-135M-Instruct from its GGUF file,
# continued with FoT through the runner, then evaluated (passkey, loss by position, short
# context). Each stage is skipped when its output exists, and training resumes exactly, so the
# same command, cut anywhere and run again, carries on.
#   bash experiments/pretrained_fot.sh [stage ...]     stages: model data train export eval
#                                                      (default: all, in that order)
# PRETRAINED_OUT (runs/smollm2), PRETRAINED_GGUF (a carried .gguf file: no download),
# PRETRAINED_CONFIG (configs/smollm2_fot.json), PRETRAINED_DATA_ARGS (experiments.code_corpus),
# PRETRAINED_MIX_ARGS (experiments.recall_data), PRETRAINED_RECALL_STYLE (how the inserted facts
# come back: repeat, question or mixed; repeat by default), PRETRAINED_LENGTHS (passkey lengths),
# PRETRAINED_TRIALS, PRETRAINED_EVAL_ARGS (eval.loss_by_position), PRETRAINED_PROBE_ARGS
# (experiments.recall_probe of the base and FoT models, the facts repeated and asked about),
# PRETRAINED_NATIVE (the base model's context, 8192) and PRETRAINED_RETENTION_ARGS
# (short-context retention: loss of held-out documents of the native length, base vs continued
# model) change it; further runner flags go in PRETRAINED_RUNNER_ARGS (the test suite runs a
# tiny version).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${PRETRAINED_OUT:-runs/smollm2}
config=${PRETRAINED_CONFIG:-configs/smollm2_fot.json}
stages=${*:-model data train export eval}
lengths=${PRETRAINED_LENGTHS:-4096,8192,16384,32768,65536,131072,262144}
trials=${PRETRAINED_TRIALS:-4}
window=${PRETRAINED_WINDOW:-1024}
native=${PRETRAINED_NATIVE:-8192}
runner_args=(--tokenizer.vocab_file=$out/tokenizer --load_checkpoint=params::$out/fot_init
             --train_dataset.json_dataset.path=$out/data/train_recall.jsonl
             --eval_dataset.json_dataset.path=$out/data/heldout.jsonl --workdir=$out/fot
             ${PRETRAINED_RUNNER_ARGS:-})

last_checkpoint() { ls -d $out/fot/*/checkpoints/step_* 2>/dev/null | sort -V | tail -1; }

for stage in $stages; do
  case $stage in
  model)
    [ -d $out/fot_init ] || python -m experiments.get_smollm2 --output_dir $out \
      ${PRETRAINED_GGUF:+--gguf $PRETRAINED_GGUF} ${PRETRAINED_MODEL_ARGS:-} ;;
  data)
    [ -f $out/data/heldout.jsonl ] || python -m experiments.code_corpus --output_dir $out/data \
      --extensions .py,.md,.rst,.txt --min_chars 6000 --tokenizer none ${PRETRAINED_DATA_ARGS:-}
    # Recipe v3: 80% of the files, cut into pieces of 12,000 characters (about the span of a
    # row group, 4 x 1024 tokens), carry 6-16 statements, 30% of them recalled at the end.
    mix_args=${PRETRAINED_MIX_ARGS:---fraction 0.8 --chunk_chars 12000 --min_facts 6 --max_facts 16 --recall_share 0.3 --min_chars 3000}
    [ -f $out/data/train_recall.jsonl ] || python -m experiments.recall_data \
      --input $out/data/train.jsonl --output $out/data/train_recall.jsonl \
      --recall_style ${PRETRAINED_RECALL_STYLE:-repeat} $mix_args ;;
  train)
    python -m running_utils.runner --config $config "${runner_args[@]}" ;;
  export)
    [ -d $out/exported ] || python -m EasyLM.models.llama.convert_easylm_to_hf \
      --load_checkpoint "$(last_checkpoint)" --output_dir $out/exported \
      --tokenizer_path $out/tokenizer --dtype bf16 ;;
  eval)
    checkpoint=$(last_checkpoint)
    passkey=(--lengths $lengths --depths 0,0.25,0.5,0.75,1 --trials $trials)
    python -m eval.passkey --hf_model $out/hf --tokenizer $out/tokenizer --dtype bf16 \
      "${passkey[@]}" --output_dir $out/eval/passkey_base
    python -m eval.passkey --load_checkpoint "$checkpoint" --tokenizer $out/tokenizer \
      --dtype bf16 --last_context_length $window "${passkey[@]}" --output_dir $out/eval/passkey_fot
    python -m eval.passkey --hf_model $out/exported --tokenizer $out/tokenizer --dtype bf16 \
      "${passkey[@]}" --output_dir $out/eval/passkey_fot_hf
    python -m eval.passkey --load_checkpoint "$checkpoint" --tokenizer $out/tokenizer \
      --dtype bf16 --last_context_length $window "${passkey[@]}" --no_memory \
      --output_dir $out/eval/passkey_fot_no_memory
    # Facts read back or asked about, base model (whole text in its context) and FoT model
    probe_args=${PRETRAINED_PROBE_ARGS:---chars 12000}
    for style in repeat question; do
      python -m experiments.recall_probe --hf_model $out/hf --tokenizer $out/tokenizer \
        --data $out/data/heldout.jsonl --dtype bf16 --recall_style $style \
        --output_dir $out/eval/recall_base_$style $probe_args
      python -m experiments.recall_probe --load_checkpoint "$checkpoint" \
        --tokenizer $out/tokenizer --data $out/data/heldout.jsonl \
        --last_context_length $window --dtype bf16 --recall_style $style \
        --output_dir $out/eval/recall_fot_$style $probe_args
    done
    eval_args=${PRETRAINED_EVAL_ARGS:---min_length 16384 --max_length 16384 --max_docs 16 --bucket_size 1024}
    python -m eval.loss_by_position --load_checkpoint "$checkpoint" --tokenizer $out/tokenizer \
      --data $out/data/heldout.jsonl --last_context_length $window --context_windows 1,4,16,64 \
      --dtype bf16 --output_dir $out/eval/loss_fot $eval_args
    retention_args=${PRETRAINED_RETENTION_ARGS:---min_length $native --max_length $native --max_docs 32 --bucket_size 1024}
    python -m eval.loss_by_position --hf_model $out/hf --tokenizer $out/tokenizer \
      --data $out/data/heldout.jsonl --dtype bf16 --output_dir $out/eval/retention_base \
      $retention_args
    python -m eval.loss_by_position --load_checkpoint "$checkpoint" --tokenizer $out/tokenizer \
      --data $out/data/heldout.jsonl --last_context_length $native --dtype bf16 \
      --output_dir $out/eval/retention_fot $retention_args ;;
  *) echo "unknown stage $stage (model data train export eval)" >&2; exit 2 ;;
  esac
done
