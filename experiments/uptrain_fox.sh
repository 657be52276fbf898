#!/usr/bin/env bash
# The FoX uptraining recipe (docs/forgetting.md): experiments/uptrain.sh with family fox.
#   bash experiments/uptrain_fox.sh [stage ...]     stages: model data train eval
exec bash "$(dirname "$0")/uptrain.sh" fox "$@"
