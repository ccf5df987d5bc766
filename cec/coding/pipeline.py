"""CEC inference (paper Sec. 3.3-3.4): concept scores for a note, then one yes/no question per ICD code.

Stage 1 asks the concept model one Fig. 3 question per concept of the set; concepts at or above the concept
threshold are the predicted positives. Stage 2 asks the label model, for each code, the Fig. 4 question with
k concepts of the code's own set (its highest-scoring ones, or a random sample) plus m predicted-negative
concepts from outside it, each with its Yes/No answer (or a linear concept bottleneck, cec.coding.bottleneck).
All questions of a stage share one cached note (cec.engine.scorer.PrefixScorer); what a stage asks is its
cec.coding.stages.Stage. The stages run their adapters over one copy of the base weights.

Each stage is a method that returns plain data: `concept_probs` (stage 1), `code_probs` (stage 2 for given shown
concepts, several variants against one prefix), `direct_probs` (direct coding, the baseline of Table 2, with or
without its adapter). `code_note` composes them into a NoteResult; cec.coding.output shapes it as JSON.
`CECPipeline.load` is the one loading path (infer.py, the HTTP service, the evaluation); `resolve_config` the one
place where a pipeline folder and overrides of its fields become the config it runs.

A pipeline folder (what `infer.py --pipeline` takes and what training writes) holds `cec_pipeline.json`:
    {"base_model", "concept_set", "concept_adapter", "label_adapter", "direct_adapter", "concept_threshold", "threshold",
     "k", "m", "sampling", "label_layout", "max_note_tokens", "dev_metrics"}
with the adapter paths relative to the folder. label_layout ("paper", "compact" or "compact-probs",
cec.coding.stages) defaults to the layout the label adapter was trained with (its cec_adapter.json), "paper"
without one.
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

from cec.coding import negation, stages
from cec.coding.bottleneck import Bottleneck
from cec.coding.calibration import Platt
from cec.coding.concepts import load_concept_set
from cec.coding.segment import segment_note
from cec.coding.stages import Stage, prefix_ids, question_ids
from cec.engine.scorer import PrefixScorer, head_for
from cec.engine.lora import load_adapter, lora_layers, read_adapter_config
from cec.engine.model import Transformer
from cec.engine.weights import load_model
from cec.errors import AdapterError, ConfigError, DataError
from cec.io import atomic_write_json

PIPELINE_FILE = "cec_pipeline.json"
LABEL_STAGES = ("llm", "linear")
SAMPLING = ("top", "random")
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DEFAULT_PIPELINE = RESOURCES / "pipelines" / "gemma3-270m-codiesp-d50"
ADAPTERS = {"concept": "concept_adapter", "label": "label_adapter", "direct": "direct_adapter"}  # stage -> field


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
    label_layout: str | None = None  # "paper" | "compact" | "compact-probs"; None = the label adapter's, else "paper"
    max_note_tokens: int = 3000  # longer notes are segmented by section (cec.coding.segment) to this budget
    seed: int = 0
    label_stage: str = "llm"  # stage 2: "llm" (the label adapter, paper Sec. 3.4) or "linear" (cec.coding.bottleneck)
    bottleneck: str | None = None  # the linear stage's weights (JSON), relative to the pipeline folder
    calibration: dict | None = None  # Platt scaling of code probabilities (cec.coding.calibration), fitted on dev
    negation: str = "off"  # "on": clauses stated as absent, past or of a relative are blanked (cec.coding.negation)
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
        if config.negation not in negation.MODES:
            raise DataError(f"{path}: negation {config.negation!r} is not one of {', '.join(negation.MODES)}")
        if config.label_layout not in (None, *stages.LABEL_LAYOUTS):
            raise DataError(f"{path}: label_layout {config.label_layout!r} is not one of "
                            f"{', '.join(stages.LABEL_LAYOUTS)}")
        return config, folder

    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / PIPELINE_FILE, asdict(self))

    def adapter(self, stage: str) -> Path | None:
        """The adapter folder of a stage ("concept", "label", "direct") in a resolved config; None = none."""
        path = getattr(self, ADAPTERS[stage])
        return Path(path) if path else None


def trained_layout(adapter: Path | None) -> str:
    """The label layout an adapter was trained with (cec_adapter.json "prompts"); "paper" when it does not say."""
    if adapter is None:
        return "paper"
    layout = read_adapter_config(adapter)[1].get("prompts", "paper")
    if layout not in stages.LABEL_LAYOUTS:
        raise AdapterError(f"{adapter}: unknown prompt layout {layout!r} in cec_adapter.json")
    return layout


def resolve_beside(folder: Path, name: str) -> str:
    """A relative path in cec_pipeline.json names a file beside it when one is there; otherwise it stays a name
    (embedded model, shipped concept set, hub id) or a path from the working directory."""
    candidate = folder / name
    return str(candidate) if not Path(name).is_absolute() and candidate.exists() else name


def resolve_config(folder: str | Path | None, *, quiet: bool = False, **overrides) -> PipelineConfig:
    """The config a pipeline runs: its folder's cec_pipeline.json (folder None: PipelineConfig's defaults, no
    adapters) with `overrides` of its fields (None = the folder's), the model and concept set resolved beside the
    folder (resolve_beside), the adapter and bottleneck paths absolute, and label_layout known. The one place the
    override rules live:
    - another label adapter brings its own layout (unless label_layout is given too) and is for the label LLM;
    - another stage 2 than the pipeline's turns its calibration off (fitted for that stage), and warns that its
      threshold may not fit unless a threshold is given (or quiet: the caller tunes its own thresholds).
    An adapter path of "" means the base model without that adapter."""
    if folder is None:
        config, folder = PipelineConfig(), None
    else:
        config, folder = PipelineConfig.load(folder)
    if overrides.get("label_adapter") is not None and overrides.get("label_layout") is None:
        config.label_layout = None  # another label adapter brings its own layout
    if overrides.get("label_adapter") and overrides.get("label_stage") is None:
        overrides["label_stage"] = "llm"  # a label adapter is for the label LLM
    if overrides.get("label_stage") not in (None, config.label_stage):
        # the calibration and threshold were fitted for the pipeline's own stage 2
        config.calibration = None
        if overrides.get("threshold") is None and not quiet:
            print(f"[cec] stage 2 is {overrides['label_stage']}, not the pipeline's {config.label_stage}: its "
                  f"calibration is off and its threshold {config.threshold} may not fit (--threshold)",
                  file=sys.stderr)
    for k, v in overrides.items():
        if v is not None:
            setattr(config, k, v)
    if folder is not None:
        config.base_model = resolve_beside(folder, config.base_model)
        config.concept_set = resolve_beside(folder, config.concept_set)
    for name in (*ADAPTERS.values(), "bottleneck"):
        rel = getattr(config, name)
        if rel:
            setattr(config, name, str(((folder or Path()) / rel).resolve()))
    if config.label_stage not in LABEL_STAGES:
        raise DataError(f"label stage {config.label_stage!r} is not one of {', '.join(LABEL_STAGES)}")
    if config.label_stage == "linear" and not config.bottleneck:
        raise DataError(f"{folder}: label_stage 'linear' but no bottleneck file in {PIPELINE_FILE}")
    if config.negation not in negation.MODES:
        raise ConfigError(f"negation {config.negation!r} is not one of {', '.join(negation.MODES)}")
    if config.m < 0 or config.sampling not in SAMPLING:
        raise ConfigError(f"pipeline config: m={config.m}, sampling={config.sampling!r} (m >= 0; top or random)")
    if config.label_layout is None:
        config.label_layout = trained_layout(config.adapter("label"))
    return config


def share_base(model: Transformer) -> Transformer:
    """A second Transformer whose parameters are the same tensors as `model`'s (no copy of the weights)."""
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.tie_weights()
    return twin.eval()


@torch.no_grad()
def fold_lora(model: Transformer) -> None:
    """Fold each LoRA layer into a weight of its own, leaving the shared base weights untouched: inference then
    runs plain linears (no LoRA matmuls), at the memory cost of one copy of the adapted layers."""
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
    another stage or code set, and fold it unless fold=False."""
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


def predicted_answers(config: PipelineConfig, cs, concept_p: torch.Tensor, shown: list[list[int]]
                      ) -> list[list[tuple[str, bool, float]]]:
    """Per code (cs.codes order), the (concept, answered yes, P(yes)) items its stage-2 question shows: the
    concept model's answers, Yes at P >= concept_threshold. Inference and training (predicted answers) alike."""
    p = concept_p.tolist()
    return [[(cs.concepts[i].text, p[i] >= config.concept_threshold, p[i]) for i in ids] for ids in shown]


@dataclass
class NoteResult:
    """One coded note, unrounded; cec.coding.output turns it into the JSON contract."""
    note_id: str | None
    code_probs: torch.Tensor  # P(code) in cs.codes order (calibrated when the pipeline has a calibration)
    predicted: list[bool]  # per code: code_probs >= the pipeline's threshold
    concept_probs: torch.Tensor  # stage 1: P(yes) per concept of the set
    shown: list[list[int]] | None  # per code, the concepts the label LLM was shown; None for a linear stage 2
    timing: dict  # prefix_tokens, questions, seconds, concept_seconds, label_seconds
    truncation: dict | None = None  # {"note_tokens", "kept_tokens", "kept_percent"} when the note was cut to fit
    not_read: list | None = None  # negation.Blanked spans the model was not given (negation "on")
    direct_probs: torch.Tensor | None = None  # the direct-FT question per code, when the linear stage reads it
    lexical_logits: torch.Tensor | None = None  # the lexical prior's logit per code, when the linear stage reads it
    lexical_terms: list | None = None  # with it, per code its n-grams with the largest terms (LexicalPrior.top_terms)


class CECPipeline:
    def __init__(self, tokenizer, concept_set, config: PipelineConfig, concept_model: Transformer,
                 label_model: Transformer | None = None, *, bottleneck: Bottleneck | None = None,
                 direct_models: dict[bool, Transformer] | None = None, batch_tokens: int = 4096,
                 attention: str = "cascade", compile: bool = False):
        """label_model: the label LLM (None for a linear stage 2); direct_models: {fine_tuned: model} of
        direct coding ({} unless loaded with direct=True). attention, compile: how the scorers run their question
        batches (cec.engine.scorer.PrefixScorer); the same scores either way."""
        self.tokenizer, self.cs, self.config = tokenizer, concept_set, config
        if config.label_stage == "linear" and bottleneck is None:
            raise DataError("label_stage 'linear' needs a concept bottleneck (bottleneck in cec_pipeline.json)")
        self.bottleneck = bottleneck
        self.calibration = Platt.from_json(config.calibration)
        self.concept_prefix_tokens = 0  # of the last note stage 1 scored
        self.stages = {"concept": stages.CONCEPT, "label": stages.get("label", config.label_layout or "paper"),
                       "direct": stages.DIRECT}
        self.concept_model = concept_model
        self.label_model = concept_model if label_model is None else label_model  # linear: its scorer asks nothing

        def scorer(model, stage: Stage) -> PrefixScorer:
            # keep_last: evidence (cec.coding.attribution) asks more questions of the note coding just prefilled
            return PrefixScorer(model, head_for(model, *stage.answer_ids(tokenizer)), batch_tokens=batch_tokens,
                                pad_id=tokenizer.pad_id or 0, keep_last=True, attention=attention, compile=compile)

        self.concept_scorer = scorer(self.concept_model, self.stages["concept"])
        self.label_scorer = scorer(self.label_model, self.stages["label"])
        self.direct_scorers = {ft: scorer(m, stages.DIRECT) for ft, m in (direct_models or {}).items()}
        # the questions of stages 1 and direct do not depend on the note: tokenized once
        self.concept_questions = [question_ids(tokenizer, stages.CONCEPT.question(c.text))
                                  for c in concept_set.concepts]
        self.direct_questions = [question_ids(tokenizer, stages.DIRECT.question(concept_set.descriptions[c]))
                                 for c in concept_set.codes] if direct_models else []

    @property
    def layout(self) -> str:
        """The label stage's prompt layout."""
        return self.stages["label"].layout

    @classmethod
    def load(cls, folder: str | Path | None = None, *, config: PipelineConfig | None = None, model=None,
             tokenizer=None, concept_set=None, device="cpu", dtype=None, fold: bool = True, direct: bool = False,
             batch_tokens: int = 4096, attention: str = "cascade", compile: bool = False,
             **overrides) -> "CECPipeline":
        """A pipeline folder (default: the shipped Gemma 3 270M / CodiEsp-D50 one), with optional overrides of
        its config fields (threshold, k, ...; resolve_config) and of its concept set; or a config resolve_config
        made. fold: fold the adapters into private copies of the layers they adapt (faster; fold=False keeps
        LoRA layers, e.g. to inspect them). direct: also direct coding, on the bare base weights and (with a
        direct_adapter) with the direct adapter, each a twin; the concept adapter then goes on a twin as well.
        attention ("cascade" or "flex") and compile: the scorers' paths (PrefixScorer); compile=True compiles on
        the first note of each batch shape (minutes on a CPU), then runs at fixed shapes."""
        if isinstance(concept_set, (str, Path)):
            overrides["concept_set"], concept_set = str(concept_set), None
        if config is None:
            config = resolve_config(folder or DEFAULT_PIPELINE, **overrides)
        elif folder is not None or any(v is not None for v in overrides.values()):
            raise TypeError("CECPipeline.load takes a folder and overrides, or a resolved config, not both")
        if model is None:
            model, tokenizer = load_model(config.base_model, device=device, dtype=dtype)
        cs = concept_set or load_concept_set(config.concept_set)
        linear = config.label_stage == "linear"
        bottleneck = Bottleneck.load(config.bottleneck, cs) if linear else None
        reads_direct = bottleneck is not None and bottleneck.direct is not None
        if reads_direct and not config.direct_adapter:
            raise DataError(f"{config.bottleneck}: the concept bottleneck reads the direct question, but the "
                            "pipeline has no direct_adapter")
        # twins first: each is the base model until its own adapter goes in
        label_model = None if linear else share_base(model)
        direct_models = {False: share_base(model)} if direct else {}
        if (direct or reads_direct) and config.direct_adapter:
            direct_models[True] = share_base(model)
        concept_model = share_base(model) if direct_models else model
        for m, stage in ((concept_model, "concept"), (label_model, "label"), (direct_models.get(True), "direct")):
            if m is not None and config.adapter(stage):
                load_stage_adapter(m, config.adapter(stage), stage, cs, fold)
        return cls(tokenizer, cs, config, concept_model, label_model, bottleneck=bottleneck,
                   direct_models=direct_models, batch_tokens=batch_tokens, attention=attention, compile=compile)

    def fit_note(self, text: str) -> str:
        return self.fit_note_info(text)[0]

    def not_read(self, text: str) -> list[negation.Blanked]:
        """The spans of the note the model is not given (negation "on"; cec.coding.negation), in note order."""
        return negation.blanked_spans(text) if self.config.negation == "on" else []

    def readable(self, text: str, not_read: list[negation.Blanked] | None = None) -> str:
        """The note as the model reads it: not_read (default: self.not_read(text)) blanked with spaces, every
        character offset kept."""
        spans = self.not_read(text) if not_read is None else not_read
        return negation.blank(text, spans) if spans else text

    def fit_note_info(self, text: str, not_read: list[negation.Blanked] | None = None) -> tuple[str, dict | None]:
        """(the note fitted to max_note_tokens, None when it fits whole, else {"note_tokens", "kept_tokens",
        "kept_percent"}). Longer notes keep their most relevant sections (cec.coding.segment), with a warning.
        The fitted note is `readable` (negation blanked where it is on; not_read: its spans, when known)."""
        text = self.readable(text, not_read)
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

    # -- the stages: each returns plain data ------------------------------------------------------------------
    @torch.no_grad()
    def concept_probs(self, text: str, concept_ids: list[int] | None = None) -> torch.Tensor:
        """Stage 1: P(yes) of every concept of the set (or of concept_ids only) against the fitted note."""
        prefix = prefix_ids(self.tokenizer, self.stages["concept"].prefix(text))
        self.concept_prefix_tokens = len(prefix)
        questions = self.concept_questions if concept_ids is None else [self.concept_questions[i] for i in concept_ids]
        return torch.sigmoid(self.concept_scorer.score(prefix, questions))

    def label_question_ids(self, concept_p: torch.Tensor, shown: list[list[int]], cs=None) -> list[list[int]]:
        """Token ids of the code questions (cs.codes order) showing these concepts with their predicted answers."""
        cs = cs or self.cs
        stage = self.stages["label"]
        return [question_ids(self.tokenizer, stage.question(cs.descriptions[code], answers))
                for code, answers in zip(cs.codes, predicted_answers(self.config, cs, concept_p, shown))]

    @torch.no_grad()
    def code_probs(self, text: str, concept_p: torch.Tensor, variants: list[tuple[list[list[int]], object]]
                   ) -> list[torch.Tensor]:
        """Stage 2 (the label LLM) for one or more variants, each (concepts shown per code, concept set or view):
        one label prefix prefilled, each distinct question scored once. Returns P(code) in code order per
        variant."""
        per_variant = [self.label_question_ids(concept_p, shown, cs) for shown, cs in variants]
        unique: dict[tuple, int] = {}
        for questions in per_variant:
            for q in questions:
                unique.setdefault(tuple(q), len(unique))
        prefix = prefix_ids(self.tokenizer, self.stages["label"].prefix(text))
        p = torch.sigmoid(self.label_scorer.score(prefix, [list(q) for q in unique]))
        return [p[[unique[tuple(q)] for q in questions]] for questions in per_variant]

    @torch.no_grad()
    def direct_probs(self, text: str, fine_tuned: bool = False) -> torch.Tensor:
        """Direct coding: P(yes) of one direct question per code description against the fitted note, asked the
        base model itself (fine_tuned=False) or the direct adapter. Needs CECPipeline.load(..., direct=True)."""
        if fine_tuned not in self.direct_scorers:
            what = "direct coding with the direct adapter" if fine_tuned else "direct coding"
            raise ValueError(f"{what} is not loaded (CECPipeline.load(..., direct=True), a direct_adapter for FT)")
        prefix = prefix_ids(self.tokenizer, self.stages["direct"].prefix(text))
        return torch.sigmoid(self.direct_scorers[fine_tuned].score(prefix, self.direct_questions))

    def bottleneck_direct(self, text: str) -> torch.Tensor | None:
        """The direct-FT question's P(yes) per code that the linear stage 2 reads beside the concepts (the fitted
        note); None when it reads none."""
        if self.bottleneck is None or self.bottleneck.direct is None:
            return None
        return self.direct_probs(text, fine_tuned=True)

    def bottleneck_lexical(self, text: str) -> torch.Tensor | None:
        """The lexical prior's logit per code that the linear stage 2 reads beside the concepts (of the fitted note,
        as the model reads it); None when it reads none."""
        if self.bottleneck is None or self.bottleneck.lexical is None:
            return None
        return torch.as_tensor(self.bottleneck.prior.logits([text])[0])

    # -- the whole note -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def code_note(self, text: str, note_id: str | None = None) -> NoteResult:
        """Stage 1, then stage 2 (the label LLM on the concepts shown_concepts picks, or the linear bottleneck),
        then the calibration and the threshold."""
        if not text.strip():
            raise DataError("the note is empty")
        cfg, cs = self.config, self.cs
        t0 = time.perf_counter()
        not_read = self.not_read(text)
        text, truncation = self.fit_note_info(text, not_read)
        concept_p = self.concept_probs(text)
        t1 = time.perf_counter()
        direct_p, lexical_z = self.bottleneck_direct(text), self.bottleneck_lexical(text)
        if self.bottleneck is not None:
            shown, code_p = None, self.bottleneck.probs(concept_p, direct_p, lexical_z)
            questions = len(self.concept_questions) + (0 if direct_p is None else len(self.direct_questions))
        else:
            shown = shown_concepts(cfg, cs, concept_p, note_id)
            code_p = self.code_probs(text, concept_p, [(shown, cs)])[0]
            questions = len(self.concept_questions) + len(shown)
        if self.calibration is not None:
            code_p = self.calibration(code_p)
        t2 = time.perf_counter()
        timing = {"prefix_tokens": self.concept_prefix_tokens, "questions": questions, "seconds": t2 - t0,
                  "concept_seconds": t1 - t0, "label_seconds": t2 - t1}
        predicted = [p >= cfg.threshold for p in code_p.tolist()]
        terms = None if lexical_z is None else self.bottleneck.prior.top_terms(text)
        return NoteResult(note_id, code_p, predicted, concept_p, shown, timing, truncation, not_read, direct_p,
                          lexical_z, terms)
