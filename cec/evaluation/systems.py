"""Evaluation of CEC, its ablations and a baseline on a test split, thresholds tuned on dev (paper Tables 1-4).

Systems (keys for `--systems`):
    cec-k{K}   CEC, the label model shown K concepts of the code's own set + m outside negatives (Table 3)
    leaf       CEC over a view of the concept set that keeps only each code's leaf-level concepts (Table 2)
    direct     direct coding without fine-tuning: the base model, one direct yes/no question per code (Table 2)
    direct-ft  the same with a direct-stage LoRA adapter (Table 2)
    tfidf      TF-IDF + one-vs-rest logistic regression (cec.evaluation.baselines), trained on --train

Every system is scored by the stage functions of cec.coding.pipeline.CECPipeline, loaded through its one loading
path. Stage-1 concept probabilities do not depend on K: they are computed once per note and reused by every cec-k
and by leaf; all their code questions are then scored against one cached label prefix (duplicates once).
Every per-note score vector goes to an append-only JSONL cache keyed by the note (id + text hash) and by a
fingerprint of what the system depends on (model, adapter bytes, prompts, k, ...), so a re-run resumes and a
changed setup never reuses stale scores. Metrics are always computed from the cached vectors.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cec.coding import negation, stages
from cec.coding.concepts import ConceptSet, load_concept_set
from cec.coding.pipeline import (ADAPTERS, DEFAULT_PIPELINE, PIPELINE_FILE, CECPipeline, PipelineConfig,
                                 resolve_config, shown_concepts)
from cec.engine.weights import default_dtype
from cec.errors import AdapterError, ConfigError, DataError
from cec.evaluation import baselines
from cec.evaluation.metrics import GRID_TEXT, evaluate, label_matrix, micro_f1, tune_threshold
from cec.evaluation.score_cache import ScoreCache, digest, text_hash

DEFAULT_KS = (3, 4, 5, 6)
CONCEPTS = "concept-probs"  # the cache's name for stage-1 concept probabilities
MACRO_F1_DEFINITION = "mean of per-label F1 (scikit-learn average='macro'); CAML's harmonic-mean variant is " \
                      "macro_f1_caml in the JSON"


# ---------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    key: str  # "cec-k5", "leaf", "concept-mean", "direct", "direct-ft", "tfidf"
    kind: str  # "cec", "leaf", "concept-mean", "direct", "direct-ft", "tfidf"
    k: int | None = None

    def name(self, m: int) -> str:
        return {"cec": f"CEC (C+ = {self.k}, C- = {m})", "leaf": f"Leaf concepts (C+ = {self.k}, C- = {m})",
                "concept-mean": "Concept mean, all own concepts", "direct": "Direct coding w/o FT",
                "direct-ft": "Direct coding w. FT",
                "tfidf": "TF-IDF + LR (one-vs-rest)"}[self.kind]


def parse_systems(keys: list[str] | None, main_k: int, have_direct_adapter: bool, have_train: bool
                  ) -> tuple[list[System], list[str]]:
    """(systems, notes on systems left out). None = every system the inputs allow. leaf runs at main_k."""
    notes = []
    if keys is None:
        keys = [f"cec-k{k}" for k in sorted(set(DEFAULT_KS) | {main_k})] + ["leaf", "direct"]
        if have_direct_adapter:
            keys.append("direct-ft")
        else:
            notes.append("direct-ft left out: no direct adapter (--direct-adapter, or direct_adapter in "
                         f"{PIPELINE_FILE})")
        if have_train:
            keys.append("tfidf")
        else:
            notes.append("tfidf left out: no --train notes")
    systems = []
    for key in dict.fromkeys(keys):
        m = re.fullmatch(r"cec-k(\d+)", key)
        if m:
            if int(m.group(1)) < 1:
                raise ConfigError(f"system {key}: k must be at least 1")
            systems.append(System(key, "cec", int(m.group(1))))
        elif key == "leaf":
            systems.append(System(key, "leaf", main_k))
        elif key in ("concept-mean", "direct", "direct-ft", "tfidf"):
            if key == "direct-ft" and not have_direct_adapter:
                raise ConfigError("system direct-ft needs a direct adapter (--direct-adapter, or direct_adapter "
                                  f"in {PIPELINE_FILE})")
            if key == "tfidf" and not have_train:
                raise ConfigError("system tfidf needs --train notes")
            systems.append(System(key, key))
        else:
            raise ConfigError(f"unknown system {key!r} (cec-kK, leaf, concept-mean, direct, direct-ft, tfidf)")
    if not systems:
        raise ConfigError("no systems to evaluate")
    return systems, notes


# ---------------------------------------------------------------------------------------------------------
# Setup: the pipeline config and the concept set
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EvalSetup:
    config: PipelineConfig  # resolved (cec.coding.pipeline.resolve_config); stage 2 the label LLM
    concept_set: ConceptSet
    adapter_hashes: dict  # stage ("concept", "label", "direct") -> sha256 of the adapter's files, or None

    @property
    def adapters(self) -> dict:
        """stage -> absolute adapter folder or None."""
        return {stage: self.config.adapter(stage) for stage in ADAPTERS}


def adapter_hash(folder: Path | None) -> str | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = folder / name
        if not path.is_file():
            raise AdapterError(f"{folder}: no {name}")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_setup(pipeline: str | Path | None = None, *, model: str | None = None, concepts: str | None = None,
                  concept_adapter: str | None = None, label_adapter: str | None = None,
                  direct_adapter: str | None = None) -> EvalSetup:
    """A pipeline folder (default: the shipped one, or none when a model is given) with flags overriding its
    fields, as cec.coding.pipeline.resolve_config resolves them; flag paths are relative to the working directory.
    Stage 2 is the label LLM whatever the pipeline ships (the CEC systems ask it; thresholds are tuned on dev)."""
    flag = lambda path: str(Path(path).resolve()) if path else None  # noqa: E731
    config = resolve_config(Path(pipeline) if pipeline else (None if model else DEFAULT_PIPELINE), quiet=True,
                            base_model=model, concept_set=concepts, concept_adapter=flag(concept_adapter),
                            label_adapter=flag(label_adapter), direct_adapter=flag(direct_adapter),
                            label_stage="llm")
    hashes = {stage: adapter_hash(config.adapter(stage)) for stage in ADAPTERS}
    return EvalSetup(config, load_concept_set(config.concept_set), hashes)


# ---------------------------------------------------------------------------------------------------------
# The score cache's keys
# ---------------------------------------------------------------------------------------------------------
def leaf_view(cs: ConceptSet) -> ConceptSet:
    """The concept set with only each code's leaf-level concepts; concept ids unchanged, so stage-1 probabilities
    of the full set index it directly."""
    return ConceptSet(f"{cs.name}-leaf", cs.code_system, cs.codes, cs.descriptions, cs.parents, cs.concepts,
                      {c: [] for c in cs.codes}, cs.leaf_ids, cs.build)


def concept_mean(cs: ConceptSet, probs: torch.Tensor) -> torch.Tensor:
    """Stage 1 alone: each code's score the mean of its own concepts' probabilities ([..., concepts] ->
    [..., codes]; with leaf_view(cs), of its leaf concepts)."""
    return torch.stack([probs[..., cs.concept_ids(c)].mean(-1) for c in cs.codes], -1)


def fingerprints(setup: EvalSetup, systems: list[System], device, dtype) -> dict[str, str]:
    """system key (and CONCEPTS) -> hash of everything its per-note scores depend on."""
    cfg, cs = setup.config, setup.concept_set
    base = {"base_model": str(cfg.base_model), "dtype": str(dtype or default_dtype(device)),
            "device": torch.device(device).type, "max_note_tokens": cfg.max_note_tokens}
    if cfg.negation != "off":  # the notes are read blanked (older caches, negation off, keep their keys)
        base["negation"] = cfg.negation
        base["negation_rules"] = negation.RULES
    descriptions = [(c, cs.descriptions[c]) for c in cs.codes]
    label_stage = stages.get("label", cfg.label_layout or "paper")
    concept = {**base, "adapter": setup.adapter_hashes["concept"], "concepts": [c.text for c in cs.concepts],
               "prompt": stages.CONCEPT.texts, "answers": (stages.CONCEPT.yes_answers, stages.CONCEPT.no_answers)}
    out = {CONCEPTS: digest(concept)}
    label = {"concept": out[CONCEPTS], "adapter": setup.adapter_hashes["label"], "descriptions": descriptions,
             "prompt": label_stage.texts, "m": cfg.m, "sampling": cfg.sampling, "seed": cfg.seed,
             "concept_threshold": cfg.concept_threshold}
    direct = {**base, "descriptions": descriptions, "prompt": stages.DIRECT.texts,
              "answers": (stages.DIRECT.yes_answers, stages.DIRECT.no_answers)}
    for s in systems:
        if s.kind in ("cec", "leaf"):
            view = leaf_view(cs) if s.kind == "leaf" else cs
            out[s.key] = digest({**label, "k": s.k, "own": [view.concept_ids(c) for c in cs.codes]})
        elif s.kind == "concept-mean":
            out[s.key] = digest({"concept": out[CONCEPTS], "own": [cs.concept_ids(c) for c in cs.codes]})
        elif s.kind == "direct":
            out[s.key] = digest(direct)
        elif s.kind == "direct-ft":
            out[s.key] = digest({**direct, "adapter": setup.adapter_hashes["direct"]})
    return out


# ---------------------------------------------------------------------------------------------------------
# The evaluation run
# ---------------------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, setup: EvalSetup, systems: list[System], cache: ScoreCache, device="cpu",
                 dtype: torch.dtype | None = None, batch_tokens: int = 4096):
        self.setup, self.cache = setup, cache
        self.llm_systems = [s for s in systems if s.kind != "tfidf"]
        self.device, self.dtype, self.batch_tokens = device, dtype, batch_tokens
        self.keys = fingerprints(setup, systems, device, dtype)
        self.pipe: CECPipeline | None = None  # loaded only when a score is missing from the cache
        self.timing = {"notes_computed": 0, "concept_s": 0.0, "label_s": 0.0, "direct_s": 0.0}

    def scores(self, notes: list[dict], desc: str) -> dict[str, np.ndarray]:
        """system key -> [len(notes), codes] scores, computed where the cache lacks them."""
        for note in tqdm(notes, desc=desc, unit="note", dynamic_ncols=True):
            missing = [s for s in self.llm_systems if self.cache.get(s.key, self.keys[s.key], note) is None]
            if missing:
                self._compute(note, missing)
                self.cache.flush()
        return {s.key: np.array([self.cache.get(s.key, self.keys[s.key], n) for n in notes], dtype=np.float64)
                .reshape(len(notes), len(self.setup.concept_set.codes)) for s in self.llm_systems}

    @torch.no_grad()
    def _compute(self, note: dict, missing: list[System]) -> None:
        if self.pipe is None:
            direct = any(s.kind in ("direct", "direct-ft") for s in self.llm_systems)
            self.pipe = CECPipeline.load(config=self.setup.config, concept_set=self.setup.concept_set,
                                         device=self.device, dtype=self.dtype, direct=direct,
                                         batch_tokens=self.batch_tokens)
        pipe, keys, cache = self.pipe, self.keys, self.cache
        text = pipe.fit_note(note["text"])
        self.timing["notes_computed"] += 1
        staged = [s for s in missing if s.kind in ("cec", "leaf")]
        if staged or any(s.kind == "concept-mean" for s in missing):
            t0 = time.perf_counter()
            cp = cache.get(CONCEPTS, keys[CONCEPTS], note)
            if cp is None:
                cp = cache.put(CONCEPTS, keys[CONCEPTS], note, pipe.concept_probs(text))
            cp = torch.tensor(cp, dtype=torch.float32)
            t1 = time.perf_counter()
            for s in missing:
                if s.kind == "concept-mean":
                    cache.put(s.key, keys[s.key], note, concept_mean(pipe.cs, cp))
            if staged:
                leaf = leaf_view(pipe.cs)
                views = [leaf if s.kind == "leaf" else pipe.cs for s in staged]
                variants = [(shown_concepts(pipe.config, view, cp, note["id"], s.k), view)
                            for s, view in zip(staged, views)]
                for s, p in zip(staged, pipe.code_probs(text, cp, variants)):
                    cache.put(s.key, keys[s.key], note, p)
            self.timing["concept_s"] += t1 - t0
            self.timing["label_s"] += time.perf_counter() - t1
        for s in missing:
            if s.kind in ("direct", "direct-ft"):
                t0 = time.perf_counter()
                cache.put(s.key, keys[s.key], note, pipe.direct_probs(text, fine_tuned=s.kind == "direct-ft"))
                self.timing["direct_s"] += time.perf_counter() - t0


def _labels(notes: list[dict], codes: list[str], where: str) -> np.ndarray:
    try:
        return label_matrix([n["labels"] for n in notes], codes)
    except DataError as e:
        raise DataError(f"{where}: {e} of the concept set") from None


def tfidf_scores(train: list[dict], dev: list[dict], test: list[dict], codes: list[str], cache: ScoreCache
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(dev scores, test scores, info) of the TF-IDF baseline, from the cache when this exact train/dev/test
    setup was run before."""
    key = digest({"train": [(n["id"], text_hash(n["text"]), n["labels"]) for n in train],
                   "dev": [(n["id"], text_hash(n["text"]), n["labels"]) for n in dev], "codes": codes})
    info_note = {"id": "tfidf", "text": key}  # the chosen C, stored as a one-number record
    cached = [cache.get("tfidf", key, n) for n in dev + test]
    info = cache.get("tfidf-info", key, info_note)
    if all(c is not None for c in cached) and info is not None:
        return np.array(cached[: len(dev)]), np.array(cached[len(dev):]), {"C": info[0]}
    result = baselines.tfidf_logreg(train, dev, test, codes)
    for n, s in zip(dev, result.dev_scores):
        cache.put("tfidf", key, n, s)
    for n, s in zip(test, result.test_scores):
        cache.put("tfidf", key, n, s)
    cache.put("tfidf-info", key, info_note, [result.C])
    cache.flush()
    return (np.array([cache.get("tfidf", key, n) for n in dev]), np.array([cache.get("tfidf", key, n) for n in test]),
            {"C": result.C})


def system_metrics(y_dev: np.ndarray, dev_scores: np.ndarray, y_test: np.ndarray, test_scores: np.ndarray) -> dict:
    """Threshold tuned on dev by micro-F1 (metrics.tune_threshold), then every metric on test at it."""
    threshold = tune_threshold(y_dev, dev_scores)
    out = evaluate(y_test, test_scores, threshold)
    out["dev_micro_f1"] = micro_f1(y_dev, dev_scores.astype(np.float64) >= threshold)
    return out


def run_evaluation(setup: EvalSetup, systems: list[System], test: list[dict], dev: list[dict],
                   train: list[dict] | None, cache_path: str | Path, *, device="cpu",
                   dtype: torch.dtype | None = None, batch_tokens: int = 4096, sources: dict | None = None) -> dict:
    """Score every system on dev and test (resuming from the cache), tune thresholds on dev, evaluate on test.
    Returns the JSON payload: {"setup": {...}, "systems": [{system, name, micro_f1, macro_f1, ...}]}."""
    if not test:
        raise DataError("no test notes")
    if not dev:
        raise DataError("no dev notes (thresholds are tuned on dev)")
    codes = setup.concept_set.codes
    y_test, y_dev = _labels(test, codes, "test notes"), _labels(dev, codes, "dev notes")
    if any(s.kind == "tfidf" for s in systems):
        _labels(train or [], codes, "train notes")  # fail before hours of scoring, not after
    t0 = time.perf_counter()
    cache = ScoreCache(cache_path)
    try:
        evaluator = Evaluator(setup, systems, cache, device, dtype, batch_tokens)
        dev_scores = evaluator.scores(dev, "dev") if evaluator.llm_systems else {}
        test_scores = evaluator.scores(test, "test") if evaluator.llm_systems else {}
        extra = {}
        if any(s.kind == "tfidf" for s in systems):
            dev_scores["tfidf"], test_scores["tfidf"], extra["tfidf"] = tfidf_scores(train, dev, test, codes, cache)
    finally:
        cache.close()
    cfg = setup.config
    results = []
    for s in systems:
        r = {"system": s.key, "name": s.name(cfg.m), "k": s.k, "m": cfg.m if s.kind in ("cec", "leaf") else None}
        r.update(system_metrics(y_dev, dev_scores[s.key], y_test, test_scores[s.key]))
        r.update(extra.get(s.key, {}))
        results.append({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()})
    payload_setup = {
        **(sources or {}), "test_notes": len(test), "dev_notes": len(dev), "train_notes": len(train or []),
        "codes": len(codes), "codes_with_test_positives": int((y_test.sum(0) > 0).sum()),
        "codes_with_dev_positives": int((y_dev.sum(0) > 0).sum()),
        "base_model": str(cfg.base_model), "concept_set": str(cfg.concept_set),
        "adapters": {k: (str(v) if v else None) for k, v in setup.adapters.items()},
        "main_k": cfg.k, "m": cfg.m, "sampling": cfg.sampling, "concept_threshold": cfg.concept_threshold,
        "device": str(device), "dtype": str(dtype) if dtype else None,
        "macro_f1_definition": MACRO_F1_DEFINITION,
        "threshold_rule": f"tuned on dev by micro-F1 over {GRID_TEXT}, applied to test",
        "cache": str(cache_path), "seconds": round(time.perf_counter() - t0, 3),
        "timing": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in evaluator.timing.items()},
    }
    return {"setup": payload_setup, "systems": results}
