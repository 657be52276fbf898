#!/usr/bin/env bash
# Uptraining a pretrained model to another attention family: SmolLM2-135M-Instruct with every
# layer turned into a forgetting (FoX, docs/forgetting.md) or SUPRA linear attention
# (docs/linear.md) layer, continued on plain text through the runner, then the loss by
# position of the base and the uptrained model on held-out documents of the native length
# and of a longer one, each document read as one window.
#   fox:   RoPE kept, key/value shift; it starts computing what the base model did.
#   supra: every weight kept, feature maps starting as the identity; it starts from linear
#          attention of ReLU of the pretrained queries and keys, which training adapts to.
# Each stage is skipped when its output exists, and training resumes exactly, so the same
# command, cut anywhere and run again, carries on.
#   bash experiments/uptrain.sh FAMILY [stage ...]   FAMILY: fox or supra
#                                                    stages: model data train eval
#                                                    (default: all, in that order), and
#                                                    probe (on request: each layer
#                                                    converted alone against the base
#                                                    model, experiments.conversion_probe)
# The model (hf/, tokenizer/) and the corpus (data/) are those of experiments/pretrained_fot.sh
# under the same UPTRAIN_OUT (runs/smollm2), built once for all; this recipe adds
# FAMILY_init/ (the converted model), FAMILY/ (the run) and eval/FAMILY/ (one folder per
# evaluation, and report/: position_loss.png and .md, and token_loss.png and .md: the loss
# within the first UPTRAIN_SPANS (2048,NATIVE) tokens at every checkpoint). An evaluation whose
# JSON exists is not run again: delete it (or eval/FAMILY) to evaluate a later checkpoint.
# UPTRAIN_CONFIG (configs/smollm2_FAMILY.json), UPTRAIN_GGUF (a carried .gguf file: no
# download), UPTRAIN_TOKENIZER (OUT/tokenizer), UPTRAIN_DATA_ARGS (experiments.code_corpus),
# UPTRAIN_NATIVE (the base model's context, 8192), UPTRAIN_LONG (the long documents, 32768),
# UPTRAIN_DTYPE (of the evaluations, bf16), UPTRAIN_EVAL_ARGS (eval.loss_by_position:
# --max_docs 16 --bucket_size 1024) and UPTRAIN_PROBE_ARGS (experiments.conversion_probe:
# --length 1024 --max_docs 4; it writes eval/FAMILY/probe/) change it; further runner flags
# go in UPTRAIN_RUNNER_ARGS (the test suite runs a tiny version).
set -euo pipefail
cd "$(dirname "$0")/.."
family=${1:-}
case $family in
  fox) convert_args=(--attention_type forgetting --forgetting_kv_shift); label=FoX ;;
  supra) convert_args=(--attention_type supra); label=SUPRA ;;
  *) echo "usage: bash experiments/uptrain.sh fox|supra [stage ...]" >&2; exit 2 ;;
esac
shift
out=${UPTRAIN_OUT:-runs/smollm2}
config=${UPTRAIN_CONFIG:-configs/smollm2_$family.json}
tokenizer=${UPTRAIN_TOKENIZER:-$out/tokenizer}
stages=${*:-model data train eval}
native=${UPTRAIN_NATIVE:-8192}
long=${UPTRAIN_LONG:-32768}
dtype=${UPTRAIN_DTYPE:-bf16}
eval_args=${UPTRAIN_EVAL_ARGS:---max_docs 16 --bucket_size 1024}
runner_args=(--tokenizer.vocab_file=$tokenizer --load_checkpoint=params::$out/${family}_init
             --train_dataset.json_dataset.path=$out/data/train.jsonl
             --eval_dataset.json_dataset.path=$out/data/heldout.jsonl --workdir=$out/$family
             ${UPTRAIN_RUNNER_ARGS:-})

# Empty, not a failure, before the first checkpoint: the eval stage says what to run.
last_checkpoint() { ls -d $out/$family/*/checkpoints/step_* 2>/dev/null | sort -V | tail -1 || true; }

# evaluate NAME LENGTH MODEL_FLAGS...: eval.loss_by_position of held-out documents of LENGTH
# tokens (longer ones cut) into eval/FAMILY/NAME, unless it is there.
evaluate() {
  local name=$1 length=$2
  shift 2
  [ -f $out/eval/$family/$name/loss_by_position.json ] || python -m eval.loss_by_position "$@" \
    --tokenizer $tokenizer --data $out/data/heldout.jsonl --dtype $dtype \
    --min_length $length --max_length $length $eval_args \
    --output_dir $out/eval/$family/$name
}

for stage in $stages; do
  case $stage in
  model)
    [ -d $out/hf ] || python -m experiments.get_smollm2 --output_dir $out \
      ${UPTRAIN_GGUF:+--gguf $UPTRAIN_GGUF}
    [ -d $out/${family}_init ] || python -m EasyLM.models.llama.convert_hf_to_easylm \
      --hf_model $out/hf --output $out/${family}_init "${convert_args[@]}" ;;
  data)
    [ -f $out/data/heldout.jsonl ] || python -m experiments.code_corpus --output_dir $out/data \
      --extensions .py,.md,.rst,.txt --min_chars 6000 --tokenizer none ${UPTRAIN_DATA_ARGS:-} ;;
  train)
    python -m running_utils.runner --config $config "${runner_args[@]}" ;;
  eval)
    checkpoint=$(last_checkpoint)
    if [ -z "$checkpoint" ]; then
      echo "no checkpoint under $out/$family: run the train stage first" >&2; exit 2
    fi
    # Within the native context: the base model, the converted model before training (FoX's
    # conversion keeps the function, so the same loss; SUPRA's starting point) and after.
    evaluate base_native $native --hf_model $out/hf
    evaluate init_native $native --load_checkpoint params::$out/${family}_init \
      --last_context_length $native
    evaluate ${family}_native $native --load_checkpoint "$checkpoint" \
      --last_context_length $native
    # Beyond it: the base model at RoPE positions it never saw in training (nothing stops it:
    # Hugging Face's LLaMA computes any position); the uptrained model with a window as long
    # as the document (a FoX layer's context is its window and its gates decide what it
    # reads; a SUPRA layer's is its state, whatever the window).
    evaluate base_long $long --hf_model $out/hf
    evaluate ${family}_long $long --load_checkpoint "$checkpoint" --last_context_length $long
    paths=()
    for name in base_native init_native ${family}_native base_long ${family}_long; do
      paths+=($out/eval/$family/$name/loss_by_position.json)
    done
    labels="base on $native,$label init on $native,$label on $native,base on $long"
    python -m experiments.report position --split $native \
      --output_dir $out/eval/$family/report --labels "$labels,$label on $long" "${paths[@]}"
    # As a function of the tokens trained on: every checkpoint within the native context (the
    # last one's evaluation is the one above), against the base model.
    paths=($out/eval/$family/base_native/loss_by_position.json)
    for step in $(ls -d $out/$family/*/checkpoints/step_* | sort -V); do
      name=${family}_native_$(basename $step)
      [ "$step" = "$checkpoint" ] && name=${family}_native
      evaluate $name $native --load_checkpoint "$step" --last_context_length $native
      paths+=($out/eval/$family/$name/loss_by_position.json)
    done
    python -m experiments.report tokens --spans ${UPTRAIN_SPANS:-2048,$native} \
      --output_dir $out/eval/$family/report "${paths[@]}" ;;
  probe)
    [ -f $out/eval/$family/probe/probe.json ] || python -m experiments.conversion_probe \
      --hf_model $out/hf "${convert_args[@]}" --tokenizer $tokenizer \
      --data $out/data/heldout.jsonl ${UPTRAIN_PROBE_ARGS:---length 1024 --max_docs 4} \
      --output_dir $out/eval/$family/probe ;;
  *) echo "unknown stage $stage (model data train eval probe)" >&2; exit 2 ;;
  esac
done
