"""The prompts are the paper's text (Figs. 3 and 4), split into a shared prefix and per-question suffixes; each
stage (cec.coding.stages) asks its own, builds ids one way and names its answers, LoRA defaults and fixed texts."""
from dataclasses import asdict

import pytest

from cec.coding import prompts, stages
from tiny_train import tiny_tokenizer

FIG3 = """Below is a clinical note. Write a response that appropriately completes the request.
### Instruction: You will be asked whether a medical concept is relevant with the following clinical note or not. \
The concept will be a phrase of a few words. Write your answer in only one word and nothing else. Your replying \
word should be 'yes' or 'no'. The question will be : Is the note above relevant with the concept: {concept}? \
You will be provided an actual concept in place of {concept}.
### Clinical Note : NOTE TEXT
### Question: Is the note above relevant with the concept 'Ptosis'?
### Answer:"""

FIG4 = """You are a medical expert tasked with evaluating the presence of a disease in a patient's medical note. \
Provide your answer in a clear Yes/No format, on a new line.
---
### Medical Note:
(M) admission date ...
Previously you were asked about the presence of some medical concepts in the note (M). The questions, and your \
answers to each of them are provided below:
Question: Does the patient contain 'Aspiration events'?
Answer: No
Question: Does the patient contain 'Ventilator management'?
Answer: Yes
Question: Does the patient contain 'Sedation and analgesia administration'?
Answer: Yes
Based on your own answers to the above questions, answer the following question regarding the presence of a \
disease in the note (M).
---
### Question:
(Q) Based on the medical note (M), and your answers to the previous questions, does the patient contain the \
disease 'Continuous mechanical ventilation for less than 96 consecutive hours'?
Answer the question above in a clear Yes/No format, on a new line.
---
### Output Format:
- Answer the question on a new line in the format:
'Yes' or 'No'
### Response:"""


def test_concept_prompt_is_figure_3():
    assert prompts.concept_prefix("NOTE TEXT") + prompts.concept_question("Ptosis") == FIG3
    assert stages.CONCEPT.prefix("NOTE TEXT") + stages.CONCEPT.question("Ptosis") == FIG3


def test_label_prompt_is_figure_4():
    answers = [("Aspiration events", False), ("Ventilator management", True),
               ("Sedation and analgesia administration", True)]
    text = prompts.label_prefix("admission date ...") + prompts.label_question(
        "Continuous mechanical ventilation for less than 96 consecutive hours", answers)
    assert text == FIG4
    assert stages.get("label").prefix("admission date ...") + stages.get("label").question(
        "Continuous mechanical ventilation for less than 96 consecutive hours", answers) == FIG4


def test_direct_prompt_asks_about_the_description():
    q = prompts.direct_question("Essential hypertension")
    assert "'Essential hypertension'" in q and q.endswith("### Answer:")
    assert prompts.direct_prefix("NOTE").endswith("### Clinical Note : NOTE")
    assert stages.DIRECT.prefix("NOTE") + stages.DIRECT.question("Essential hypertension") == \
        prompts.direct_prefix("NOTE") + q


def test_encode_prefix_with_bos_questions_without():
    tok = tiny_tokenizer()
    prefix_ids, qs = stages.encode(tok, prompts.concept_prefix("the patient has fever"),
                                   [prompts.concept_question("fever"), prompts.concept_question("cough")])
    assert prefix_ids == stages.prefix_ids(tok, prompts.concept_prefix("the patient has fever"))
    assert qs[0] == stages.question_ids(tok, prompts.concept_question("fever"))
    assert prefix_ids[0] == tok.bos_id and prefix_ids.count(tok.bos_id) == 1
    assert all(tok.bos_id not in q for q in qs) and len(qs) == 2
    assert tok.decode(prefix_ids[1:] + qs[1]) == prompts.concept_prefix("the patient has fever") + \
        prompts.concept_question("cough")


def test_answer_ids_are_distinct_and_cover_every_spelling():
    tok = tiny_tokenizer()
    for stage in stages.STAGES.values():
        yes, no = stage.answer_ids(tok)
        assert yes and no and not set(yes) & set(no)
        assert len(yes) == len(stage.yes_answers) == len(prompts.YES_ANSWERS)  # a token for each spelling
        assert tok.decode([yes[0]]) == " yes" and tok.decode([no[-1]]) == "No"


def test_compact_label_layout_moves_the_code_independent_text_into_the_prefix():
    answers = [("Aspiration events", False), ("Ventilator management", True)]
    paper, compact = stages.get("label", "paper"), stages.get("label", "compact")
    paper_q = paper.question("Essential hypertension", answers)
    compact_q = compact.question("Essential hypertension", answers)
    assert compact_q == ("---\n### Concepts:\n- Aspiration events: No\n- Ventilator management: Yes\n"
                         "### Question: Does the patient contain the disease 'Essential hypertension'?\n### Response:")
    assert len(compact_q) < len(paper_q) / 2
    prefix = compact.prefix("NOTE")
    assert prefix.startswith(paper.prefix("NOTE")) and prefix.endswith(prompts.LABEL_COMPACT_GUIDE)
    tok = tiny_tokenizer()
    assert compact.answer_ids(tok) == paper.answer_ids(tok)
    assert compact.train_defaults == paper.train_defaults  # a layout is a prompt, not another model
    with pytest.raises(ValueError, match="unknown label layout 'short'"):
        stages.get("label", "short")


def test_compact_probs_layout_shows_each_answers_probability():
    compact, probs = stages.get("label", "compact"), stages.get("label", "compact-probs")
    answers = [("Aspiration events", False, 0.0712), ("Ventilator management", True, 0.925)]
    q = probs.question("Essential hypertension", answers)
    assert q == ("---\n### Concepts:\n- Aspiration events: No (0.07)\n- Ventilator management: Yes (0.93)\n"
                 "### Question: Does the patient contain the disease 'Essential hypertension'?\n### Response:")
    assert compact.question("Essential hypertension", answers) == compact.question(
        "Essential hypertension", [a[:2] for a in answers])  # the other layouts do not show it
    prefix = probs.prefix("NOTE")
    assert prefix.endswith(prompts.LABEL_PROBS_GUIDE) and "probability of Yes" in prefix
    assert prefix.startswith(compact.prefix("NOTE")[: -len(prompts.LABEL_COMPACT_GUIDE)])
    assert probs.shows_probabilities and not compact.shows_probabilities
    tok = tiny_tokenizer()
    assert probs.answer_ids(tok) == compact.answer_ids(tok)
    for pseudo in ([("Aspiration events", False)], [("Aspiration events", False, None)]):
        with pytest.raises(ValueError, match="shows the concept model's probabilities"):
            probs.question("Essential hypertension", pseudo)


def test_stage_lookup_and_misuse_are_clear_errors():
    assert [stages.get(name).name for name in stages.NAMES] == list(stages.NAMES)
    assert stages.LABEL_LAYOUTS == ("paper", "compact", "compact-probs") and stages.LAYOUTS["concept"] == ("paper",)
    with pytest.raises(ValueError, match="unknown stage 'codes'"):
        stages.get("codes")
    with pytest.raises(ValueError, match="unknown concept layout 'compact'"):
        stages.get("concept", "compact")
    with pytest.raises(ValueError, match="shows no concepts"):
        stages.DIRECT.question("Essential hypertension", [("fever", True)])


@pytest.mark.parametrize("key", list(stages.STAGES))
def test_stage_texts_are_the_fixed_text_of_its_prompts(key):
    """A cache fingerprint hashes stage.texts: each of them is in the stage's prompts, and layouts differ."""
    stage = stages.STAGES[key]
    prompt = stage.prefix("NOTE") + stage.question("SUBJECT", [("CONCEPT", True, 0.9)] if stage.shows_concepts else ())
    for text in stage.texts:
        for piece in text.replace("{", "}").split("}")[::2]:  # the literal text between placeholders
            assert piece in prompt, (key, piece)
    others = [s.texts for k, s in stages.STAGES.items() if k != key]
    assert stage.texts not in others


def test_trainer_defaults_are_the_papers_appendix_a():
    assert {name: asdict(stages.get(name).train_defaults) for name in stages.NAMES} == {
        "concept": dict(r=32, alpha=32.0, dropout=0.05, targets="all-linear", steps=500),
        "label": dict(r=32, alpha=128.0, dropout=0.05, targets="k_proj,v_proj", steps=2000),
        "direct": dict(r=32, alpha=32.0, dropout=0.05, targets="all-linear", steps=100),
    }
