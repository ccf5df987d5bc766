"""Tiny, local stand-ins for the training tests: a byte-level BPE tokenizer, a tiny random model saved as an HF
folder that cec.engine.weights.load_model reads, a small concept set and a few notes."""
from pathlib import Path

import torch

from cec.coding.concepts import Concept, ConceptSet
from cec.engine.tokenizer import Tokenizer, train_byte_bpe

WORDS = ("yes no Yes No yes no Yes No the patient note has pain fever cough chest renal failure acute chronic "
         "hypertension diabetes question answer concept relevant medical disease")


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE; with a larger vocabulary it learns the prompt templates, so tiny-model runs stay short."""
    from cec.coding import prompts
    templates = [prompts.CONCEPT_INSTRUCTION, prompts.CONCEPT_QUESTION, prompts.LABEL_INSTRUCTION,
                 prompts.LABEL_CONCEPTS_INTRO, prompts.LABEL_CONCEPT_LINE, prompts.LABEL_QUESTION,
                 prompts.DIRECT_INSTRUCTION, prompts.DIRECT_QUESTION]
    corpus = [" yes no Yes No yes no Yes No"] * 200 + [WORDS] * 20
    if vocab_size > 300:
        corpus += templates * 20
    return train_byte_bpe(corpus, vocab_size, source="tiny")


def save_tiny_model(folder: Path, family: str = "gemma3", seed: int = 0, vocab_size: int = 1024, **over) -> Path:
    """config.json + model.safetensors + tokenizer.json of a tiny random model of `family` (see hf_tiny)."""
    from hf_tiny import hf_model

    hf = hf_model(family, seed=seed, vocab_size=vocab_size, **over)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 2, 1, 0
    hf.save_pretrained(folder)
    tiny_tokenizer(vocab_size).save(folder)
    return Path(folder)


CODES = {  # code: (description, [parent concepts], [leaf concepts])
    "A1": ("Acute renal failure", ["kidney injury", "creatinine rise"], ["oliguria", "dialysis started"]),
    "B2": ("Chronic kidney disease", ["kidney injury", "long term dialysis"], ["stage four", "low filtration"]),
    "C3": ("Essential hypertension", ["high blood pressure"], ["on lisinopril", "headache"]),
    "D4": ("Type two diabetes", ["high glucose", "insulin"], ["metformin", "foot ulcer", "neuropathy"]),
    "E5": ("Fever of unknown origin", ["fever"], ["night sweats", "chills"]),
}


def tiny_concept_set() -> ConceptSet:
    texts: list[str] = []
    parent_ids, leaf_ids = {}, {}
    levels = {}
    for code, (_, parents, leaves) in CODES.items():
        for level, phrases, into in (("parent", parents, parent_ids), ("leaf", leaves, leaf_ids)):
            ids = []
            for p in phrases:
                if p not in texts:
                    texts.append(p)
                    levels[p] = level
                ids.append(texts.index(p))
            into[code] = ids
    concepts = [Concept(i, t, levels[t]) for i, t in enumerate(texts)]
    return ConceptSet("tiny", "icd9cm", list(CODES), {c: v[0] for c, v in CODES.items()},
                      {c: ("P" + c, "parent of " + c) for c in CODES}, concepts, parent_ids, leaf_ids)


def tiny_notes(n: int = 6) -> list[dict]:
    codes = list(CODES)
    notes = []
    for i in range(n):
        labels = [codes[i % 5], codes[(i * 2 + 1) % 5]] if i % 3 else [codes[i % 5]]
        text = f"patient {i} has " + " and ".join(CODES[c][0].lower() for c in labels) + ". fever cough."
        notes.append({"id": f"n{i}", "text": text, "labels": list(dict.fromkeys(labels))})
    return notes


def random_lora_(model, seed: int = 0, scale: float = 0.05) -> None:
    from cec.engine.lora import lora_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def made_up_stage1(cs, n: int, codes: int, rng) -> list[tuple[dict, list[float]]]:
    """n notes ("note i") labelled at random with the first `codes` codes of cs, each with stage-1 probabilities
    of every concept: high on its codes' own concepts, low elsewhere (for score caches without running a model)."""
    out = []
    for i in range(n):
        labels = [c for c in cs.codes[:codes] if rng.random() < 0.4]
        p = rng.uniform(0.01, 0.3, len(cs.concepts))
        for c in labels:
            p[cs.concept_ids(c)] = rng.uniform(0.5, 0.99, len(cs.concept_ids(c)))
        out.append(({"id": f"n{i}", "text": f"note {i}", "labels": labels}, p.tolist()))
    return out
