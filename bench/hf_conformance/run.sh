#!/usr/bin/env bash
# transformers' own model and generation test mixins on the four architectures: ../shared/hf-conformance/run.sh (its
# README says how to assemble transformers' test tree) run on a copy of that harness with GraftLM's adaptations, the
# files in tests_harness/ here, laid over its own. Same arguments and knobs as that run.sh:
#
#   bash bench/hf_conformance/run.sh /work/venv523/bin/python /tmp/hfconf/conformance.log
#
# The adaptations, each what transformers' tests do for an in-library model of that kind:
# - the task heads each architecture registers (DFA, BSBR, Scaffolded: sequence / token classification, question
#   answering) are named in its tester and listed in MODEL_*_MAPPING_NAMES (hf_names.py), as the registry registers
#   them: CausalLMModelTester finds head classes only in transformers' own namespace, so unnamed they are skipped;
# - BSBR checks its cache with its own _check_past_key_values_for_generate (open-chunk keys/values; completed chunks
#   are compressed states), as transformers' tests do for models with their own cache formats, and skips the custom
#   4-D mask test with the reason its model card gives;
# - Scaffolded's tester builds its composite config (two GPT-2 sub-configs, fusers after both layers).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${HF_CONFORMANCE_DIR:-$HERE/../../../shared/hf-conformance}"
[ -f "$SHARED/run.sh" ] || { echo "no harness at $SHARED (set HF_CONFORMANCE_DIR)" >&2; exit 2; }
COPY="$(mktemp -d)"
trap 'rm -rf "$COPY"' EXIT
cp -r "$SHARED"/. "$COPY"
chmod -R u+w "$COPY"
cp "$HERE"/tests_harness/*.py "$COPY/tests_harness/"
bash "$COPY/run.sh" "$@"
