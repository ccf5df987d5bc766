"""Label-stage examples from the concept model's own answers (`train.py --concept-answers predicted`, issue 15).

The paper's label examples show pseudo answers made from the gold codes (cec.coding.stages); at inference the
answers come from the concept model. Here every training note is scored by a concept adapter as inference
scores it (CECPipeline.concept_probs on the fitted note), and each code question shows what inference would
show: shown_concepts' k own concepts (top or random) + m predicted negatives from outside, answered Yes when
P >= concept_threshold (pipeline.predicted_answers; the compact-probs layout also shows each P). Which codes a
note is asked about stays the paper's (stages.label_codes); the label is whether the code is gold.

The concept probabilities go to a score cache in the run folder (cec.evaluation.score_cache, the evaluation's
key for stage-1 scores), so a resumed or repeated run does not score a note twice.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from cec.coding import stages
from cec.coding.pipeline import CECPipeline, PipelineConfig, load_stage_adapter, predicted_answers, share_base
from cec.coding.pipeline import shown_concepts
from cec.evaluation.score_cache import ScoreCache
from cec.evaluation.systems import CONCEPTS, EvalSetup, adapter_hash, fingerprints

CONCEPT_ANSWERS = ("pseudo", "predicted")  # train.py --concept-answers
SCORES_FILE = "concept_scores.jsonl"


def concept_key(config: PipelineConfig, cs, device, dtype) -> str:
    """The score cache's fingerprint of stage-1 probabilities: base model, concept adapter bytes, concepts,
    prompt, note budget (the evaluation's own, cec.evaluation.systems.fingerprints)."""
    setup = EvalSetup(config, cs, {"concept": adapter_hash(config.adapter("concept")), "label": None,
                                   "direct": None})
    return fingerprints(setup, [], device, dtype)[CONCEPTS]


@torch.no_grad()
def score_notes(model, tokenizer, cs, config: PipelineConfig, notes: list[dict], out: str | Path,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """note id -> P(yes) of every concept, from the concept adapter of `config` on a twin of `model` (its base
    weights shared, the model itself untouched); scores already in out/concept_scores.jsonl are reused. A
    folder that is not a concept-stage adapter, or one for another code set, is an AdapterError."""
    key = concept_key(config, cs, model.device, model.dtype)
    twin = load_stage_adapter(share_base(model), config.adapter("concept"), "concept", cs)
    pipe = CECPipeline(tokenizer, cs, config, twin)
    Path(out).mkdir(parents=True, exist_ok=True)
    cache = ScoreCache(Path(out) / SCORES_FILE)
    try:
        for note in tqdm(notes, desc="concept scores", unit="note", dynamic_ncols=True, disable=not progress):
            if cache.get(CONCEPTS, key, note) is None:
                cache.put(CONCEPTS, key, note, pipe.concept_probs(pipe.fit_note(note["text"])))
                cache.flush()
        return {n["id"]: torch.tensor(cache.get(CONCEPTS, key, n), dtype=torch.float32) for n in notes}
    finally:
        cache.close()


class PredictedAnswers:
    """Draws a note's label questions with the concept model's answers, as inference asks them."""

    def __init__(self, config: PipelineConfig, cs, probs: dict[str, torch.Tensor]):
        self.config, self.cs, self.probs = config, cs, probs

    def shown(self, note_id: str, epoch: int) -> list[list[int]]:
        """Concepts shown per code (cs.codes order): shown_concepts, its random draws seeded per epoch too."""
        return shown_concepts(self.config, self.cs, self.probs[note_id], f"{epoch}/{note_id}")

    def draw(self, stage: stages.Stage, note: dict, rng: random.Random, opts, epoch: int
             ) -> list[tuple[str, int, str]]:
        cs = self.cs
        answers = dict(zip(cs.codes, predicted_answers(self.config, cs, self.probs[note["id"]],
                                                       self.shown(note["id"], epoch))))
        return [(stage.question(cs.descriptions[code], answers[code]), y, code)
                for code, y in stages.label_codes(note, cs, rng, opts)]
