"""How often the pipeline codes a finding that a note states as absent, past or in a family member.

    python scripts/negation_check.py [--pipeline DIR] [--threads 2] > negation.json

Each case is a short note written for this project (not from any dataset) stating one finding of a code of
the shipped CodiEsp-D50 set as absent ("denies cough"), past ("quit smoking in 2015") or in a relative
("mother had diabetes"), beside a control note where the same finding is present. A benchmark, not a test:
it prints JSON with how many absent findings are still coded and how many present ones are, per case. With the
linear stage 2 a code depends only on its own concepts, so only those are scored (exact, and fast); with the
label LLM each note is coded whole.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cec.cli import user_errors  # noqa: E402
from cec.coding.output import code_list  # noqa: E402
from cec.coding.pipeline import CECPipeline  # noqa: E402

# (code, kind, note stating the finding as absent/past/family, control note stating it as present)
CASES = [
    ("R50.9", "negated", "A 45-year-old man came for a check-up. No fever. Vital signs were normal.",
     "A 45-year-old man came for a check-up. He had a fever of 39 C. Vital signs were otherwise normal."),
    ("R50.9", "negated", "The patient denied fever or chills during the last week.",
     "The patient reported fever and chills during the last week."),
    ("R05", "negated", "She denies cough. Lungs were clear on auscultation.",
     "She has had a persistent cough for three weeks. Lungs showed scattered rhonchi."),
    ("R05", "negated", "No cough, sputum or hemoptysis was reported.",
     "He reported a productive cough with yellow sputum."),
    ("R06.00", "negated", "At rest there was no dyspnea and oxygen saturation was 98%.",
     "At rest he had marked dyspnea and oxygen saturation was 88%."),
    ("R52", "negated", "The patient was free of pain throughout the admission.",
     "The patient complained of severe pain throughout the admission."),
    ("R51", "negated", "She denied headache, visual changes or neck stiffness.",
     "She complained of an intense headache with neck stiffness."),
    ("R10.9", "negated", "The abdomen was soft and there was no abdominal pain.",
     "He presented with diffuse abdominal pain for two days."),
    ("R11.10", "negated", "There was no nausea or vomiting.",
     "He had repeated vomiting since the previous evening."),
    ("R19.7", "negated", "Bowel habits were normal, without diarrhea.",
     "He had watery diarrhea, six stools a day, for a week."),
    ("R31.9", "negated", "Urinalysis showed no hematuria and no proteinuria.",
     "Urinalysis showed gross hematuria."),
    ("R80.9", "negated", "The 24-hour urine collection was negative for proteinuria.",
     "The 24-hour urine collection showed proteinuria of 3.5 g."),
    ("R60.9", "negated", "Examination of the legs showed no edema.",
     "Examination showed pitting edema of both legs."),
    ("R53.1", "negated", "Neurological examination found no weakness of the limbs.",
     "She reported generalized weakness and could not climb stairs."),
    ("R42", "negated", "He denied dizziness, syncope or palpitations.",
     "He reported dizziness when standing up."),
    ("R56.9", "negated", "There were no seizures during the hospital stay.",
     "He had two generalized seizures during the hospital stay."),
    ("R63.4", "negated", "Her weight was stable, with no weight loss in the past year.",
     "She had lost 12 kg of weight over the past six months."),
    ("R63.0", "negated", "Appetite was preserved; no anorexia.",
     "He described loss of appetite and anorexia for a month."),
    ("R20.2", "negated", "Sensation was intact and she denied tingling or paresthesia.",
     "She reported paresthesia and tingling in both hands."),
    ("R23.1", "negated", "Skin and mucosae were normally colored, without pallor.",
     "On examination there was marked pallor of the skin and mucosae."),
    ("I95.9", "negated", "Blood pressure was 125/80 mmHg; there was no hypotension.",
     "Blood pressure was 80/45 mmHg: he was hypotensive."),
    ("R58", "negated", "There was no bleeding from the surgical wound.",
     "There was active bleeding from the surgical wound."),
    ("D64.9", "negated", "Hemoglobin was 14.5 g/dL; anemia was ruled out.",
     "Hemoglobin was 7.9 g/dL, consistent with anemia."),
    ("R59.9", "negated", "No lymphadenopathy was palpable in the neck, axillae or groin.",
     "Enlarged lymph nodes were palpable in the neck, axillae and groin."),
    ("F17.210", "past", "He is a former smoker who quit smoking in 2015.",
     "He is a current smoker of 20 cigarettes a day."),
    ("F17.210", "past", "She smoked in her youth but has not smoked for twenty years.",
     "She smokes a pack of cigarettes a day."),
    ("R56.9", "past", "He had a febrile seizure as a child and none since.",
     "He was admitted after a seizure this morning."),
    ("E11.9", "family", "His mother had type 2 diabetes. He has no diabetes himself.",
     "He has type 2 diabetes treated with metformin."),
    ("I10", "family", "Her father had hypertension; her own blood pressure is normal.",
     "She has hypertension treated with enalapril."),
    ("C64.9", "family", "His brother was treated for kidney cancer; his own kidneys were normal on CT.",
     "CT showed a renal mass; biopsy confirmed kidney cancer."),
    ("B20", "negated", "HIV serology was negative.",
     "HIV serology was positive and he started antiretroviral therapy."),
    ("B19.20", "negated", "Hepatitis C antibodies were negative.",
     "Hepatitis C antibodies were positive with a detectable viral load."),
    ("N18.9", "family", "Her mother was on dialysis for chronic kidney disease; her own renal function was normal.",
     "She has chronic kidney disease with a creatinine of 3.1 mg/dL."),
]


def code_probability(pipe, text: str, code: str) -> float:
    """P(code) as the pipeline decides it; with the linear stage only the code's own concepts are scored."""
    cs = pipe.cs
    j = cs.codes.index(code)
    if pipe.bottleneck is not None:
        own = cs.concept_ids(code)
        full = torch.zeros(len(cs.concepts))
        fitted = pipe.fit_note(text)
        full[own] = pipe.concept_probs(fitted, own)
        p = pipe.bottleneck.probs(full, pipe.bottleneck_direct(fitted), pipe.bottleneck_lexical(fitted))[j]
        return float(pipe.calibration(p) if pipe.calibration is not None else p)
    return next(c["probability"] for c in code_list(pipe.code_note(text), pipe) if c["code"] == code)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    ap.add_argument("--label-stage", choices=("llm", "linear"), help="override the pipeline's stage 2")
    ap.add_argument("--negation", choices=("on", "off"), help="override the pipeline's negation handling")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = CECPipeline.load(args.pipeline, label_stage=args.label_stage, negation=args.negation)
    t0 = time.perf_counter()
    rows = []
    for code, kind, absent, present in CASES:
        pa, pp = code_probability(pipe, absent, code), code_probability(pipe, present, code)
        rows.append({"code": code, "kind": kind, "not_read": [absent[b.start:b.end] for b in pipe.not_read(absent)],
                     "control_not_read": [present[b.start:b.end] for b in pipe.not_read(present)],
                     "absent_probability": round(pa, 4),
                     "present_probability": round(pp, 4), "absent_coded": pa >= pipe.config.threshold,
                     "present_coded": pp >= pipe.config.threshold})
    n = len(rows)
    out = {"cases": n, "threshold": pipe.config.threshold, "label_stage": pipe.config.label_stage,
           "negation": pipe.config.negation,
           "absent_coded": sum(r["absent_coded"] for r in rows), "present_coded": sum(r["present_coded"] for r in rows),
           "absent_coded_share": round(sum(r["absent_coded"] for r in rows) / n, 3),
           "absent_lower_than_present": sum(r["absent_probability"] < r["present_probability"] for r in rows),
           "by_kind": {k: sum(r["absent_coded"] for r in rows if r["kind"] == k) for k in ("negated", "past", "family")},
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
