"""Evaluate CEC, its ablations and the TF-IDF baseline on a test split; thresholds tuned on dev (Tables 1-4).

    python scripts/evaluate.py --test runs/codiesp/test.jsonl --dev runs/codiesp/dev.jsonl \\
        --train runs/codiesp/train.jsonl --pipeline runs/pipeline --out results/codiesp.md \\
        --json results/codiesp.json [--max-notes 20] [--systems cec-k3 cec-k6 leaf direct]

Systems: cec-k3 cec-k4 cec-k5 cec-k6 (CEC with k own concepts + m outside negatives), leaf (CEC over each
code's leaf-level concepts only, at the pipeline's k), direct (base model, one direct yes/no question per code
description), direct-ft (the same with a direct-stage adapter: --direct-adapter, or `direct_adapter` in
cec_pipeline.json), tfidf (TF-IDF + one-vs-rest logistic regression on --train). Default: all the inputs allow.

For each system the threshold is tuned on dev by micro-F1 and applied to test; the table reports macro/micro
AUC, macro/micro F1 (macro F1 = the mean of per-label F1) and P@5. Per-note scores are cached in
JSON_STEM.scores.jsonl beside --json (or --cache), so an interrupted run resumes where it stopped.
"""
# The command is cec/commands/evaluate.py (installed as `cec-evaluate`); this file keeps the script working.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.cli import user_errors  # noqa: E402
from cec.commands.evaluate import *  # noqa: E402,F401,F403
from cec.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
