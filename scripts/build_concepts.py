"""Build a concept set (paper Sec. 3.2): generate candidate concepts with an LLM, then merge near-duplicates.

Dedup only, from a raw candidates file (how the shipped sets are built):
    python scripts/build_concepts.py --raw cec/resources/concepts/raw/mimic3-50.json --out cec/resources/concepts/mimic3-50.json

Generate, then dedup, with an OpenAI-compatible endpoint (key from CEC_API_KEY or OPENAI_API_KEY):
    python scripts/build_concepts.py --codes codes.tsv --code-system icd9cm \
        --icd9-descriptions ../shared/data/icd9/ICD9_descriptions \
        --backend http --url https://api.example.com/v1 --model gpt-4o \
        --raw runs/my-set.raw.json --out runs/my-set.json
or with our engine and a local model (greedy): --backend local --model-path PATH [--device cuda --dtype bfloat16].

The codes file is one code per line, optionally `code<TAB>description`, or a TSV whose header names a `code`
column and optionally `description`, `parent_code`, `parent_description` (these override the code system, e.g.
for headings that CMS titles lack). Generation writes RAW after every call and resumes from it: rerun the same
command to retry codes whose replies could not be parsed (their raw replies are saved in RAW's .replies folder).
Prints a JSON summary with the concept counts per level.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from cec.cli import add_runtime_args, runtime, user_errors
from cec.coding.concepts import (DEFAULT_GAMMA, ChatCompletionsBackend, LocalModelBackend, build_concept_set,
                          code_entries, generate_candidates, read_candidates)
from cec.data import read_text_file
from cec.errors import DataError
from cec.coding.icd import code_system
from cec.io import prepare_output


def read_code_table(path: Path, normalize) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(codes in order, descriptions by code, parent code by code) from a codes file."""
    lines = [(n, ln) for n, ln in enumerate(read_text_file(path).split("\n"), 1) if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty codes file")
    header = [h.strip().lower() for h in lines[0][1].split("\t")]
    cols = {"code": 0, "description": 1}
    if "code" in header:
        cols = {k: header.index(k) for k in ("code", "description", "parent_code", "parent_description")
                if k in header}
        lines = lines[1:]
    codes, descriptions, parents = [], {}, {}

    def field(fields, key):
        i = cols.get(key)
        return fields[i].strip() if i is not None and i < len(fields) else ""

    for n, line in lines:
        fields = line.split("\t")
        try:
            code = normalize(field(fields, "code"))
            if "-" in code:  # a range ("401-405.99"): the normaliser passes it through, so check its bounds
                bounds = code.split("-")
                if len(bounds) != 2:
                    raise DataError(f"not a code range: {code!r}")
                for bound in bounds:
                    normalize(bound)
        except DataError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if code in codes:
            raise DataError(f"{path}:{n}: duplicate code {code!r}")
        codes.append(code)
        if field(fields, "description"):
            descriptions[code] = field(fields, "description")
        if field(fields, "parent_code"):
            parents[code] = field(fields, "parent_code")
            if field(fields, "parent_description"):
                descriptions.setdefault(parents[code], field(fields, "parent_description"))
    return codes, descriptions, parents


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, required=True, help="raw candidates JSON (read; written when generating)")
    ap.add_argument("--out", type=Path, required=True, help="built concept set JSON")
    ap.add_argument("--name", help="concept set name (default: the raw file's code_set)")
    ap.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="cosine at or above which phrases merge")
    gen = ap.add_argument_group("generation (with --codes)")
    gen.add_argument("--codes", type=Path, help="codes to generate concepts for")
    gen.add_argument("--code-system", choices=("icd9cm", "icd10cm"))
    gen.add_argument("--icd9-descriptions", type=Path, help="code<TAB>title table with headings and ranges")
    gen.add_argument("--d-icd-diagnoses", type=Path, help="MIMIC D_ICD_DIAGNOSES.csv")
    gen.add_argument("--d-icd-procedures", type=Path, help="MIMIC D_ICD_PROCEDURES.csv")
    gen.add_argument("--backend", choices=("http", "local"))
    gen.add_argument("--url", help="chat-completions endpoint or its base URL (http backend)")
    gen.add_argument("--model", help="model name (http backend)")
    gen.add_argument("--timeout", type=float, default=180.0)
    gen.add_argument("--retries", type=int, default=4, help="retries of a failed HTTP request")
    gen.add_argument("--model-path", help="local model folder, GGUF file or hub id (local backend)")
    add_runtime_args(gen)  # local backend
    gen.add_argument("--max-new-tokens", type=int, default=1024)
    gen.add_argument("--attempts", type=int, default=3, help="calls per batch before a code is reported failed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    prepare_output(args.out)

    if args.codes:
        if not args.code_system or not args.backend:
            raise DataError("--codes needs --code-system and --backend")
        sources = {}
        if args.code_system == "icd9cm":
            sources = dict(descriptions=args.icd9_descriptions, d_icd_diagnoses=args.d_icd_diagnoses,
                           d_icd_procedures=args.d_icd_procedures)
        system = code_system(args.code_system, **sources)
        codes, descriptions, parents = read_code_table(args.codes, system.normalize)
        prepare_output(args.raw)
        entries = code_entries(codes, system, descriptions, parents)
        if args.backend == "http":
            if not args.url or not args.model:
                raise DataError("--backend http needs --url and --model")
            backend = ChatCompletionsBackend(args.url, args.model, timeout=args.timeout, retries=args.retries)
        else:
            if not args.model_path:
                raise DataError("--backend local needs --model-path")
            device, dtype = runtime(args)
            backend = LocalModelBackend(args.model_path, device=device, dtype=dtype, max_new_tokens=args.max_new_tokens)
        raw = generate_candidates(entries, backend, args.raw, code_system=args.code_system,
                                  code_set=args.name or args.codes.stem, max_attempts=args.attempts)
        for f in raw["failures"]:
            logging.error("no %s concepts for %s; last reply: %s", f["prompt"], f["code"], f["reply"])
    raw = read_candidates(args.raw)
    cs = build_concept_set(raw, name=args.name, gamma=args.gamma, source=str(args.raw))
    cs.save(args.out)
    summary = {"out": str(args.out), "name": cs.name, "code_system": cs.code_system, "codes": len(cs.codes),
               "counts": cs.counts, "candidates": cs.build["candidates"], "gamma": args.gamma}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
