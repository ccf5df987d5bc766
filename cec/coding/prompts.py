"""The prompts of the paper, split for prefix sharing: a prefix (instruction + note) shared by every question
about one note, and one question per concept or code that ends where the model answers yes or no.

- concept stage, Fig. 3: [Instruction] + [Clinical Note] | [Question] + [Answer Prompt]
- label stage, Fig. 4:   [Instruction] + [Medical Note]  | [Concept Predictions] + [Question] + [Answer Prompt]
- direct coding (the baseline of Table 2): Fig. 3's layout asking about a code description instead of a concept.

Label-stage layouts (DESIGN.md, item 5):
- "paper": prefix + question is exactly Fig. 4's text. Each code question repeats about 100 tokens that do not
  depend on the code (the concept-answer preamble, the question frame, the output format).
- "compact": the same instruction, note and answer format, with the code-independent text moved into the shared
  prefix and each concept answer on one short line, so a code question is about 80 tokens instead of 230. For
  adapters trained with it (train.py --label-layout compact); an adapter records its layout in cec_adapter.json.

Which stage asks which of these texts, in which layout, and how token ids are built: cec.coding.stages.
"""
from __future__ import annotations

from typing import Sequence

CONCEPT_INSTRUCTION = (
    "Below is a clinical note. Write a response that appropriately completes the request.\n"
    "### Instruction: You will be asked whether a medical concept is relevant with the following clinical note "
    "or not. The concept will be a phrase of a few words. Write your answer in only one word and nothing else. "
    "Your replying word should be 'yes' or 'no'. The question will be : Is the note above relevant with the "
    "concept: {concept}? You will be provided an actual concept in place of {concept}.\n"
    "### Clinical Note : "
)
CONCEPT_QUESTION = "\n### Question: Is the note above relevant with the concept '{concept}'?\n### Answer:"

LABEL_INSTRUCTION = (
    "You are a medical expert tasked with evaluating the presence of a disease in a patient's medical note. "
    "Provide your answer in a clear Yes/No format, on a new line.\n"
    "---\n"
    "### Medical Note:\n"
    "(M) "
)
LABEL_CONCEPTS_INTRO = (
    "\nPreviously you were asked about the presence of some medical concepts in the note (M). The questions, "
    "and your answers to each of them are provided below:\n"
)
LABEL_CONCEPT_LINE = "Question: Does the patient contain '{concept}'?\nAnswer: {answer}\n"
LABEL_QUESTION = (
    "Based on your own answers to the above questions, answer the following question regarding the presence of "
    "a disease in the note (M).\n"
    "---\n"
    "### Question:\n"
    "(Q) Based on the medical note (M), and your answers to the previous questions, does the patient contain "
    "the disease '{description}'?\n"
    "Answer the question above in a clear Yes/No format, on a new line.\n"
    "---\n"
    "### Output Format:\n"
    "- Answer the question on a new line in the format:\n"
    "'Yes' or 'No'\n"
    "### Response:"
)

# compact label layout: what Fig. 4 says once per code, said once per note
LABEL_COMPACT_GUIDE = (
    "\n---\n"
    "Previously you were asked about the presence of some medical concepts in the note (M). Below, each question "
    "about a disease first lists some of those concepts with your answer to each (Yes or No). Based on the medical "
    "note (M) and your answers, say whether the patient contains the disease. Answer in a clear Yes/No format, on "
    "a new line: 'Yes' or 'No'.\n"
)
LABEL_PROBS_GUIDE = LABEL_COMPACT_GUIDE.replace(
    "with your answer to each (Yes or No)", "with your answer to each (Yes or No) and your probability of Yes")
LABEL_COMPACT_CONCEPT_LINE = "- {concept}: {answer}\n"
# the "compact-probs" layout: each answer with the concept model's probability, "Yes (0.93)" (issue 15)
LABEL_PROBS_ANSWER = "{answer} ({p:.2f})"
LABEL_COMPACT_QUESTION = "---\n### Concepts:\n{lines}### Question: Does the patient contain the disease '{description}'?\n### Response:"

DIRECT_INSTRUCTION = (
    "Below is a clinical note. Write a response that appropriately completes the request.\n"
    "### Instruction: You will be asked whether a diagnosis or procedure applies to the following clinical note "
    "or not. It will be given by its ICD code description. Write your answer in only one word and nothing else. "
    "Your replying word should be 'yes' or 'no'. The question will be : Does the note above report the "
    "diagnosis or procedure: {description}? You will be provided an actual description in place of "
    "{description}.\n"
    "### Clinical Note : "
)
DIRECT_QUESTION = "\n### Question: Does the note above report the diagnosis or procedure '{description}'?\n### Answer:"

# answer spellings for the yes/no head (cec.engine.heads.answer_token_ids turns them into token ids after a prompt)
YES_ANSWERS = (" yes", "yes", " Yes", "Yes")
NO_ANSWERS = (" no", "no", " No", "No")


def concept_prefix(note: str) -> str:
    return CONCEPT_INSTRUCTION + note


def concept_question(concept: str) -> str:
    return CONCEPT_QUESTION.format(concept=concept)


def label_prefix(note: str) -> str:
    return LABEL_INSTRUCTION + note


def yes_no(yes: bool) -> str:
    return "Yes" if yes else "No"


def label_question(description: str, concept_answers: Sequence[tuple]) -> str:
    """The text after the label prefix: the concept predictions ("Yes"/"No" each), then the code question.
    concept_answers: (concept, answered yes) or (concept, answered yes, P(yes)) items; the probability is not shown."""
    lines = "".join(LABEL_CONCEPT_LINE.format(concept=c, answer=yes_no(yes)) for c, yes, *_ in concept_answers)
    return LABEL_CONCEPTS_INTRO + lines + LABEL_QUESTION.format(description=description)


def compact_label_prefix(note: str) -> str:
    return LABEL_INSTRUCTION + note + LABEL_COMPACT_GUIDE


def compact_label_question(description: str, concept_answers: Sequence[tuple]) -> str:
    lines = "".join(LABEL_COMPACT_CONCEPT_LINE.format(concept=c, answer=yes_no(yes)) for c, yes, *_ in concept_answers)
    return LABEL_COMPACT_QUESTION.format(lines=lines, description=description)


def probs_label_prefix(note: str) -> str:
    return LABEL_INSTRUCTION + note + LABEL_PROBS_GUIDE


def probs_label_question(description: str, concept_answers: Sequence[tuple]) -> str:
    """The compact question with each answer's probability: (concept, answered yes, P(yes)) items, where P(yes)
    is the concept model's; pseudo answers have none (a ValueError)."""
    if any(len(a) < 3 or a[2] is None for a in concept_answers):
        raise ValueError("the compact-probs layout shows the concept model's probabilities: these answers have none")
    shown = ((c, LABEL_PROBS_ANSWER.format(answer=yes_no(yes), p=p)) for c, yes, p in concept_answers)
    lines = "".join(LABEL_COMPACT_CONCEPT_LINE.format(concept=c, answer=a) for c, a in shown)
    return LABEL_COMPACT_QUESTION.format(lines=lines, description=description)


def direct_prefix(note: str) -> str:
    return DIRECT_INSTRUCTION + note


def direct_question(description: str) -> str:
    return DIRECT_QUESTION.format(description=description)
