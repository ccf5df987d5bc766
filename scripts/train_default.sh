#!/usr/bin/env bash
# The recipe of the shipped default pipeline (Gemma 3 270M, CodiEsp-D50): train the concept, label and direct
# adapters, write the pipeline folder, tune the code threshold on the first half of dev and report the second.
#   scripts/train_default.sh MODEL DATA_DIR OUT_DIR     (DATA_DIR from scripts/prepare_codiesp.py)
# Step counts, the training notes the bottleneck also fits on and the device come from the environment:
# CONCEPT_STEPS, HARD_STEPS, LABEL_STEPS, COMPACT_STEPS, DIRECT_STEPS, TRAIN_FIT_NOTES, CODIESP_SRC (the CodiEsp
# folder, default ../shared/data/codiesp), DEVICE, PY. The concept
# adapter of the default is concept-hard/: concept/ continued HARD_STEPS with hard negatives (codes near the true
# ones in the ICD tree, and concept/'s own false positives). Stage 2 of the default is the linear concept
# bottleneck fitted at the end. The label stage is trained in the paper's Fig. 4 layout (label/), then continued on
# the compact layout (label-compact/, the pipeline's default: code questions of ~70 tokens instead of ~220).
set -euo pipefail
MODEL=$1 DATA=$2 OUT=$3
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
CONCEPT_STEPS=${CONCEPT_STEPS:-500} HARD_STEPS=${HARD_STEPS:-30} LABEL_STEPS=${LABEL_STEPS:-600} COMPACT_STEPS=${COMPACT_STEPS:-30}
DIRECT_STEPS=${DIRECT_STEPS:-200}
DEV_HALF=${DEV_HALF:-125} TRAIN_FIT_NOTES=${TRAIN_FIT_NOTES:-500}
CODIESP_SRC=${CODIESP_SRC:-../shared/data/codiesp}
mkdir -p "$OUT"
common=(--data "$DATA/train.jsonl" --dev "$DATA/dev.jsonl" --concepts codiesp-d50 --model "$MODEL"
        --device "$DEVICE" --save-dtype bfloat16 --no-progress --eval-every 0 --dev-notes 32 --save-every 100)
$PY train.py --stage concept "${common[@]}" --steps "$CONCEPT_STEPS" --out "$OUT/concept"
# scores every training note with concept/ first (its false positives are the confused negatives), then trains
$PY train.py --stage concept "${common[@]}" --init-adapter "$OUT/concept" --related-negatives 0.5 \
    --confused-negatives 0.5 --confused-from "$OUT/concept" --steps "$HARD_STEPS" --lr 1e-4 --warmup 2 \
    --out "$OUT/concept-hard"
$PY train.py --stage label "${common[@]}" --steps "$LABEL_STEPS" --out "$OUT/label"
$PY train.py --stage label "${common[@]}" --label-layout compact --init-adapter "$OUT/label" \
    --steps "$COMPACT_STEPS" --lr 1e-4 --warmup 3 --out "$OUT/label-compact"
$PY train.py --stage direct "${common[@]}" --steps "$DIRECT_STEPS" --out "$OUT/direct"
$PY - "$OUT" "$MODEL" <<'PYEOF'
import sys
from cec.coding.pipeline import PipelineConfig
out, model = sys.argv[1], sys.argv[2]
# negation on: the notes are read with their negated, past and family clauses blanked (cec/coding/negation.py),
# in the evaluation below and so in the fit of stage 2, as infer.py reads them
PipelineConfig(base_model=model, concept_adapter="concept-hard", label_adapter="label-compact", direct_adapter="direct",
               negation="on").save(out)
PYEOF
head -n "$DEV_HALF" "$DATA/dev.jsonl" > "$OUT/dev_tune.jsonl"
tail -n +"$((DEV_HALF + 1))" "$DATA/dev.jsonl" > "$OUT/dev_report.jsonl"
$PY scripts/evaluate.py --pipeline "$OUT" --train "$DATA/train.jsonl" --dev "$OUT/dev_tune.jsonl" \
    --test "$OUT/dev_report.jsonl" --device "$DEVICE" --out "$OUT/results.md" --json "$OUT/results.json" \
    --title "CodiEsp-D50: thresholds tuned on dev[:$DEV_HALF], reported on dev[$DEV_HALF:]"
# Stage 2 of the default: the linear concept bottleneck, fitted on the dev notes scored above (their stage-1
# concept probabilities are in the evaluation's score cache) and on the first TRAIN_FIT_NOTES training notes, scored
# into the same cache here; its calibration and threshold on the dev notes only. It fits on coder labels: the gold
# codes whose every CodiEsp-X mention negation blanks taken out (CODIESP_SRC: the CodiEsp folder, for its X files),
# so that it does not learn to code what the pipeline cannot read. The two-fold table of the README comes from the
# same run (every row judged on all gold).
for split in dev train; do
    $PY scripts/negation_gold.py --src "$CODIESP_SRC" --split "$split" --notes "$DATA/$split.jsonl" \
        --codes "$CODIESP_SRC/codiesp50_codes.tsv" --coder-notes "$OUT/${split}_coder.jsonl" \
        > "$OUT/negation_gold_$split.json"
done
head -n "$TRAIN_FIT_NOTES" "$DATA/train.jsonl" > "$OUT/train_fit.jsonl"
$PY scripts/evaluate.py --pipeline "$OUT" --systems concept-mean --test "$OUT/train_fit.jsonl" \
    --dev "$OUT/train_fit.jsonl" --device "$DEVICE" --cache "$OUT/results.scores.jsonl" --out "$OUT/train_fit.md"
$PY scripts/crossfit_eval.py --notes "$OUT/dev_coder.jsonl" --train "$OUT/train_coder.jsonl" \
    --cache "$OUT/results.scores.jsonl" --pipeline "$OUT" --fit-train --coder-labels --out "$OUT/crossfit.md" \
    --fit-out "$OUT/bottleneck.json" > "$OUT/crossfit.json"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
fitted = json.loads((out / "crossfit.json").read_text())["fitted"]
config = json.loads((out / "cec_pipeline.json").read_text())
config.update(label_stage="linear", bottleneck="bottleneck.json", calibration=fitted["calibration"],
              threshold=fitted["threshold"])
(out / "cec_pipeline.json").write_text(json.dumps(config, indent=1) + "\n")
PYEOF
