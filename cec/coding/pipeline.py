"""CEC inference (paper Sec. 3.3-3.4): concept scores for a note, then one yes/no question per ICD code.

Stage 1 asks the concept model one Fig. 3 question per concept of the set; concepts at or above the concept
threshold are the predicted positives. Stage 2 asks the label model, for each code, the Fig. 4 question with
k concepts of the code's own set (its highest-scoring ones, or a random sample) plus m predicted-negative
concepts from outside it, each with its Yes/No answer. All questions of a stage share one cached note
(cache.PrefixScorer). The two stages run two adapters over one copy of the base weights.

A pipeline folder (what `infer.py --pipeline` takes and what training writes) holds `cec_pipeline.json`:
    {"base_model", "concept_set", "concept_adapter", "label_adapter", "direct_adapter", "concept_threshold", "threshold",
     "k", "m", "sampling", "label_layout", "max_note_tokens", "dev_metrics"}
with the adapter paths relative to the folder. label_layout (cec.coding.prompts: "paper" or "compact") defaults to the
layout the label adapter was trained with (its cec_adapter.json), "paper" without one.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from cec.coding import prompts
from cec.coding.bottleneck import Bottleneck
from cec.engine.cache import PrefixScorer, head_for
from cec.coding.calibration import Platt
from cec.errors import AdapterError, DataError
from cec.engine.model import Transformer

PIPELINE_FILE = "cec_pipeline.json"
LABEL_STAGES = ("llm", "linear")
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DEFAULT_PIPELINE = RESOURCES / "pipelines" / "gemma3-270m-codiesp-d50"


@dataclass
class PipelineConfig:
    base_model: str = "gemma3-270m"
    concept_set: str = "codiesp-d50"
    concept_adapter: str | None = None  # folder, relative to the pipeline folder; None = the base model
    label_adapter: str | None = None
    direct_adapter: str | None = None  # the direct-coding baseline (scripts/evaluate.py), not used by CEC
    concept_threshold: float = 0.5
    threshold: float = 0.5  # code threshold, tuned on dev by micro-F1
    k: int = 5  # concepts of the code's own set shown to the label model
    m: int = 2  # predicted-negative concepts from outside the code's set
    sampling: str = "top"  # "top": the code's highest-scoring concepts; "random": the paper's random sample
    label_layout: str | None = None  # "paper" | "compact"; None = the label adapter's, else "paper"
    max_note_tokens: int = 3000  # longer notes are segmented by section (cec.coding.segment) to this budget
    seed: int = 0
    label_stage: str = "llm"  # stage 2: "llm" (the label adapter, paper Sec. 3.4) or "linear" (cec.coding.bottleneck)
    bottleneck: str | None = None  # the linear stage's weights (JSON), relative to the pipeline folder
    calibration: dict | None = None  # Platt scaling of code probabilities (cec.coding.calibration), fitted on dev
    dev_metrics: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> tuple["PipelineConfig", Path]:
        folder = Path(folder)
        path = folder / PIPELINE_FILE
        if not path.is_file():
            raise DataError(f"{folder}: not a pipeline folder (no {PIPELINE_FILE})")
        try:
            d = json.loads(path.read_text())
            known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
            config = cls(**known)
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{path}: malformed ({e})") from None
        if config.label_stage not in LABEL_STAGES:
            raise DataError(f"{path}: label_stage {config.label_stage!r} is not one of {', '.join(LABEL_STAGES)}")
        Platt.from_json(config.calibration)  # a malformed calibration is refused here, not mid-run
        if config.label_layout not in (None, *prompts.LABEL_LAYOUTS):
            raise DataError(f"{path}: label_layout {config.label_layout!r} is not one of "
                            f"{', '.join(prompts.LABEL_LAYOUTS)}")
        return config, folder

    def save(self, folder: str | Path) -> None:
        from cec.io import atomic_write_json

        atomic_write_json(Path(folder) / PIPELINE_FILE, asdict(self))


def trained_layout(adapter: Path | None) -> str:
    """The label layout an adapter was trained with (cec_adapter.json "prompts"); "paper" when it does not say."""
    if adapter is None:
        return "paper"
    from cec.engine.lora import read_adapter_config

    layout = read_adapter_config(adapter)[1].get("prompts", "paper")
    if layout not in prompts.LABEL_LAYOUTS:
        raise AdapterError(f"{adapter}: unknown prompt layout {layout!r} in cec_adapter.json")
    return layout


def share_base(model: Transformer) -> Transformer:
    """A second Transformer whose parameters are the same tensors as `model`'s (no copy of the weights)."""
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.tie_weights()
    return twin.eval()


def resolve_beside(folder: Path, name: str) -> str:
    """A relative path in cec_pipeline.json names a file beside it when one is there; otherwise it stays a name
    (embedded model, shipped concept set, hub id) or a path from the working directory."""
    candidate = folder / name
    return str(candidate) if not Path(name).is_absolute() and candidate.exists() else name


@torch.no_grad()
def fold_lora(model: Transformer) -> None:
    """Fold each LoRA layer into a weight of its own, leaving the shared base weights untouched: inference then
    runs plain linears (no LoRA matmuls), at the memory cost of one copy of the adapted layers."""
    from cec.engine.lora import lora_layers

    for name, layer in lora_layers(model).items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device="meta", dtype=layer.weight.dtype)
        merged = layer.weight.float() + layer.delta_weight().to(layer.weight.device)
        lin.weight = nn.Parameter(merged.to(layer.weight.dtype), requires_grad=False)
        lin.bias = layer.bias
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lin)


def load_stage_adapter(model: Transformer, folder: Path, stage: str, cs, fold: bool = True) -> Transformer:
    """Load a stage's LoRA adapter into `model` (a twin sharing the base weights), refusing one trained for
    another stage or code set, and fold it unless fold=False. The one adapter loader of pipeline and evaluation."""
    from cec.engine.lora import load_adapter, read_adapter_config

    trained_for = read_adapter_config(folder)[1].get("stage")
    if trained_for is not None and trained_for != stage:
        raise AdapterError(f"{folder}: a {trained_for}-stage adapter, given as the {stage}-stage adapter")
    _, meta = load_adapter(model, folder, dtype=model.dtype)
    want = meta.get("concept_set_codes")
    if want and list(want) != list(cs.codes):
        raise AdapterError(f"{folder}: adapter was trained for another code set than concept set {cs.name!r}")
    if fold:
        fold_lora(model)
    return model.eval()


def shown_concepts(config: PipelineConfig, cs, concept_p: torch.Tensor, note_id: str | None = None,
                   k: int | None = None) -> list[list[int]]:
    """Stage-2 concepts shown for each code, in prompt order: k of the code's own concepts (its top-scoring ones,
    or a random sample) + m predicted negatives from the rest of the set's concepts, shuffled. cs may be a view
    of the set (same concept ids, e.g. evaluation.leaf_view): its concepts are the ones any of its codes own.
    Deterministic per (seed, note id, code)."""
    k = config.k if k is None else k
    positive = (concept_p >= config.concept_threshold).tolist()
    universe = sorted({i for code in cs.codes for i in cs.concept_ids(code)})
    negatives = [i for i in universe if not positive[i]]
    shown = []
    for code in cs.codes:
        own = cs.concept_ids(code)
        rng = random.Random(f"{config.seed}/{note_id or ''}/{code}")
        if config.sampling == "random":
            chosen = rng.sample(own, min(k, len(own)))
        else:
            chosen = sorted(own, key=lambda i: -float(concept_p[i]))[:k]
        own_set = set(own)
        outside = [i for i in negatives if i not in own_set]
        chosen = chosen + rng.sample(outside, min(config.m, len(outside)))
        rng.shuffle(chosen)
        shown.append(chosen)
    return shown


@dataclass
class NoteResult:
    note_id: str | None
    codes: list[dict]
    concept_probs: torch.Tensor
    timing: dict
    truncation: dict | None = None  # {"note_tokens", "kept_tokens", "kept_percent"} when the note was cut to fit

    def to_json(self, note_text: str, code_system: str, threshold: float) -> dict:
        doc = {"note": note_text, "code_system": code_system, "threshold": threshold, "codes": self.codes,
               "timing": self.timing}
        if self.truncation:
            doc["truncation"] = self.truncation
        return doc


class CECPipeline:
    def __init__(self, model: Transformer, tokenizer, concept_set, config: PipelineConfig,
                 concept_model: Transformer | None = None, label_model: Transformer | None = None,
                 batch_tokens: int = 4096, bottleneck: Bottleneck | None = None):
        self.tokenizer, self.cs, self.config = tokenizer, concept_set, config
        if config.label_stage == "linear" and bottleneck is None:
            raise DataError("label_stage 'linear' needs a concept bottleneck (bottleneck in cec_pipeline.json)")
        self.bottleneck = bottleneck
        self.calibration = Platt.from_json(config.calibration)
        self.concept_prefix_tokens = 0  # of the last note stage 1 scored
        self.concept_model = concept_model or model
        self.label_model = label_model or model
        yes, no = prompts.answer_ids(tokenizer, "concept")
        self.concept_scorer = PrefixScorer(self.concept_model, head_for(self.concept_model, yes, no),
                                           batch_tokens=batch_tokens, pad_id=tokenizer.pad_id or 0)
        self.layout = prompts.check_layout(config.label_layout or "paper")
        yes, no = prompts.answer_ids(tokenizer, "label", self.layout)
        self.label_scorer = PrefixScorer(self.label_model, head_for(self.label_model, yes, no),
                                         batch_tokens=batch_tokens, pad_id=tokenizer.pad_id or 0)
        # concept questions do not depend on the note: tokenize them once
        self.concept_questions = [tokenizer.encode(prompts.concept_question(c.text), add_bos=False)
                                  for c in concept_set.concepts]

    @classmethod
    def load(cls, folder: str | Path | None = None, *, model=None, tokenizer=None, concept_set=None,
             device="cpu", dtype=None, fold: bool = True, **overrides) -> "CECPipeline":
        """A pipeline folder (default: the shipped Gemma 3 270M / CodiEsp-D50 one), with optional overrides of
        its config fields (threshold, k, ...) and of its concept set. fold: fold the adapters into private
        copies of the layers they adapt (faster; fold=False keeps LoRA layers, e.g. to inspect them)."""
        from cec.coding.concepts import load_concept_set
        from cec.engine.weights import load_model

        folder = Path(folder) if folder else DEFAULT_PIPELINE
        config, folder = PipelineConfig.load(folder)
        if overrides.get("label_adapter") is not None and overrides.get("label_layout") is None:
            config.label_layout = None  # another label adapter brings its own layout
        if overrides.get("label_adapter") and overrides.get("label_stage") is None:
            overrides["label_stage"] = "llm"  # a label adapter is for the label LLM
        if overrides.get("label_stage") not in (None, config.label_stage):
            # the calibration and threshold were fitted for the pipeline's own stage 2
            config.calibration = None
            if overrides.get("threshold") is None:
                print(f"[cec] stage 2 is {overrides['label_stage']}, not the pipeline's {config.label_stage}: its "
                      f"calibration is off and its threshold {config.threshold} may not fit (--threshold)",
                      file=sys.stderr)
        for k, v in overrides.items():
            if v is not None:
                setattr(config, k, v)
        if isinstance(concept_set, (str, Path)):
            config.concept_set, concept_set = str(concept_set), None
        if model is None:
            model, tokenizer = load_model(resolve_beside(folder, config.base_model), device=device, dtype=dtype)
        cs = concept_set or load_concept_set(resolve_beside(folder, config.concept_set))
        if config.label_layout is None:
            config.label_layout = trained_layout(folder / config.label_adapter if config.label_adapter else None)
        if config.label_stage not in LABEL_STAGES:
            raise DataError(f"label stage {config.label_stage!r} is not one of {', '.join(LABEL_STAGES)}")
        linear = config.label_stage == "linear"
        bottleneck = None
        if linear:
            if not config.bottleneck:
                raise DataError(f"{folder}: label_stage 'linear' but no bottleneck file in {PIPELINE_FILE}")
            bottleneck = Bottleneck.load(folder / config.bottleneck, cs)
        concept_model, label_model = model, (model if linear else share_base(model))
        for m, stage, rel in ((concept_model, "concept", config.concept_adapter),
                              (label_model, "label", None if linear else config.label_adapter)):
            if rel:
                load_stage_adapter(m, folder / rel, stage, cs, fold)
        return cls(model, tokenizer, cs, config, concept_model, label_model, bottleneck=bottleneck)

    def fit_note(self, text: str) -> str:
        return self.fit_note_info(text)[0]

    def fit_note_info(self, text: str) -> tuple[str, dict | None]:
        """(the note fitted to max_note_tokens, None when it fits whole, else {"note_tokens", "kept_tokens",
        "kept_percent"}). Longer notes keep their most relevant sections (cec.coding.segment), with a warning."""
        from cec.coding.segment import segment_note

        budget = self.config.max_note_tokens
        count = lambda s: len(self.tokenizer.encode(s, add_bos=False))  # noqa: E731
        if len(text) < budget:  # a token is at least one character: short notes fit
            return text, None
        fitted = segment_note(text, budget, count)
        if fitted == text:
            return text, None
        total, kept = count(text), count(fitted)
        info = {"note_tokens": total, "kept_tokens": kept, "kept_percent": round(100 * kept / total, 1)}
        print(f"[cec] note of {total} tokens is longer than {budget}: kept {kept} tokens ({info['kept_percent']}%), "
              "its most relevant sections (its beginning when it has none)", file=sys.stderr)
        return fitted, info

    @torch.no_grad()
    def code_note(self, text: str, note_id: str | None = None) -> NoteResult:
        if not text.strip():
            raise DataError("the note is empty")
        cfg, cs = self.config, self.cs
        t0 = time.perf_counter()
        text, truncation = self.fit_note_info(text)
        # stage 1: every concept against the cached note
        concept_p = self.concept_probs(text)
        t1 = time.perf_counter()
        # stage 2: the linear concept bottleneck, or one label-LLM question per code with the answers of k own
        # concepts and m outside negatives
        if self.bottleneck is not None:
            code_p, evidence = self.bottleneck.probs(concept_p), self.bottleneck_evidence(concept_p)
            questions = len(self.concept_questions)
        else:
            shown = shown_concepts(cfg, cs, concept_p, note_id)
            code_p, evidence = self.code_probs(text, concept_p, [(shown, cs)])[0], self.shown_evidence(concept_p, shown)
            questions = len(self.concept_questions) + len(shown)
        if self.calibration is not None:
            code_p = self.calibration(code_p)
        t2 = time.perf_counter()
        codes = [{"code": code, "description": cs.descriptions[code], "probability": round(float(code_p[j]), 6),
                  "predicted": float(code_p[j]) >= cfg.threshold, "evidence": evidence[j]}
                 for j, code in enumerate(cs.codes)]
        codes.sort(key=lambda c: -c["probability"])
        timing = {"prefix_tokens": self.concept_prefix_tokens, "questions": questions,
                  "seconds": round(t2 - t0, 3), "concept_seconds": round(t1 - t0, 3),
                  "label_seconds": round(t2 - t1, 3)}
        return NoteResult(note_id, codes, concept_p, timing, truncation)

    def concept_probs(self, text: str, concept_ids: list[int] | None = None) -> torch.Tensor:
        """Stage 1: P(yes) of every concept of the set (or of concept_ids only) against the fitted note."""
        prefix = self.tokenizer.encode(prompts.concept_prefix(text), add_bos=True)
        self.concept_prefix_tokens = len(prefix)
        questions = self.concept_questions if concept_ids is None else [self.concept_questions[i] for i in concept_ids]
        return torch.sigmoid(self.concept_scorer.score(prefix, questions))

    def _evidence_entry(self, concept_p, i: int, role: str) -> dict:
        c = self.cs.concepts[i]
        return {"concept": c.text, "level": c.level, "probability": round(float(concept_p[i]), 6), "role": role}

    def shown_evidence(self, concept_p: torch.Tensor, shown: list[list[int]]) -> list[list[dict]]:
        """Per code, the concepts the label LLM was shown, most probable first, each with its role."""
        out = []
        for code, ids in zip(self.cs.codes, shown):
            own = set(self.cs.concept_ids(code))
            entries = [self._evidence_entry(concept_p, i, "own" if i in own else "outside") for i in ids]
            out.append(sorted(entries, key=lambda e: -e["probability"]))
        return out

    def bottleneck_evidence(self, concept_p: torch.Tensor) -> list[list[dict]]:
        """Per code, its k own concepts with the largest terms in the code's logit (cec.coding.bottleneck), largest first;
        "contribution" is that term (positive: pushed the code up)."""
        out = []
        for j in range(len(self.cs.codes)):
            terms = sorted(self.bottleneck.contributions(concept_p, j).items(), key=lambda t: -t[1])
            out.append([{**self._evidence_entry(concept_p, i, "own"), "contribution": round(w, 4)}
                        for i, w in terms[: self.config.k]])
        return out

    def label_question_ids(self, concept_p: torch.Tensor, shown: list[list[int]], cs=None) -> list[list[int]]:
        """Token ids of the code questions (cs.codes order) showing these concepts with their predicted answers."""
        cs = cs or self.cs
        positive = (concept_p >= self.config.concept_threshold).tolist()
        return [self.tokenizer.encode(prompts.label_question(
                    cs.descriptions[code], [(cs.concepts[i].text, positive[i]) for i in ids], self.layout),
                    add_bos=False) for code, ids in zip(cs.codes, shown)]

    @torch.no_grad()
    def code_probs(self, text: str, concept_p: torch.Tensor, variants: list[tuple[list[list[int]], object]]
                   ) -> list[torch.Tensor]:
        """Stage 2 for one or more variants, each (concepts shown per code, concept set or view): one label prefix
        prefilled, each distinct question scored once. Returns P(code) in code order per variant."""
        per_variant = [self.label_question_ids(concept_p, shown, cs) for shown, cs in variants]
        unique: dict[tuple, int] = {}
        for questions in per_variant:
            for q in questions:
                unique.setdefault(tuple(q), len(unique))
        prefix = self.tokenizer.encode(prompts.label_prefix(text, self.layout), add_bos=True)
        p = torch.sigmoid(self.label_scorer.score(prefix, [list(q) for q in unique]))
        return [p[[unique[tuple(q)] for q in questions]] for questions in per_variant]
