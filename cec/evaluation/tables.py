"""The evaluation's Markdown tables: the layout of the paper's Tables 1-3, AUC as in Table 4."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cec.evaluation.metrics import GRID_TEXT

COLUMNS = ("macro_auc", "micro_auc", "macro_f1", "micro_f1", "p_at_5", "threshold")


def _cell(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| Models | AUC Macro | AUC Micro | F1 Macro | F1 Micro | P@5 | Threshold |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join([label] + [_cell(r.get(c)) for c in COLUMNS]) + " |" for label, r in rows]
    return "\n".join(lines)


def render_markdown(payload: dict, title: str | None = None) -> str:
    st, by_key = payload["setup"], {r["system"]: r for r in payload["systems"]}
    model = Path(st["base_model"]).name
    main = by_key.get(f"cec-k{st['main_k']}")
    skipped = sorted({r["auc_labels_skipped"] for r in payload["systems"]})
    out = [f"# {title or 'Evaluation'}", "",
           f"Test: {st.get('test', 'test')} ({st['test_notes']} notes, {st['codes']} codes, "
           f"{st['codes_with_test_positives']} with a positive). Thresholds tuned on dev: {st.get('dev', 'dev')} "
           f"({st['dev_notes']} notes) by micro-F1 over {GRID_TEXT}, then applied to test. "
           f"Model: {model}; concept set: {Path(st['concept_set']).name}; CEC rows show C+ own concepts and "
           f"C- = {st['m']} outside negatives ({st['sampling']} sampling, concept threshold "
           f"{st['concept_threshold']}).", "",
           f"F1 Macro = {st['macro_f1_definition'].split(';')[0]}. AUC Macro skips labels without both classes "
           f"in test ({', '.join(map(str, skipped))} skipped). P@5 as CAML computes it.", ""]
    sections = []
    main_rows = ([("TF-IDF + LR (one-vs-rest)", by_key["tfidf"])] if "tfidf" in by_key else []) + \
                ([(f"CEC - {model} (C+ = {st['main_k']})", main)] if main else [])
    sections.append(("Main results (Table 1 layout)", main_rows))
    ablation = [(name, by_key[key]) for key, name in (("direct", "Direct coding w/o FT"),
                                                      ("direct-ft", "Direct coding w. FT"),
                                                      ("leaf", "Leaf concepts"))
                if key in by_key] + ([("CEC", main)] if main else [])
    sections.append(("Ablations (Table 2 layout; AUC as Table 4)", ablation))
    ks = sorted((r for r in payload["systems"] if r["system"].startswith("cec-k")), key=lambda r: -r["k"])
    sections.append(("Number of concepts (Table 3 layout)", [(f"C+ = {r['k']}, C- = {r['m']}", r) for r in ks]))
    for heading, rows in sections:
        if rows:
            out += [f"## {heading}", "", _table(rows), ""]
    return "\n".join(out)

