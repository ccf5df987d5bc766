"""Code clinical notes with ICD codes by Concept-Enhanced Coding: `python infer.py --help`.

The command is cec/commands/infer.py (installed as `cec-code`); this file keeps `python infer.py` working.

    python infer.py --note note.txt                       # the shipped pipeline; a table on stdout
    python infer.py --note note.txt --format json         # the JSON contract (cec/coding/output.py)
    python infer.py --notes notes.jsonl --out preds.jsonl # batch, resumable
    python infer.py --list-codes                          # what the pipeline codes
"""
import sys

from cec.commands.infer import *  # noqa: F401,F403  (the names tests and callers used from infer.py)
from cec.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
