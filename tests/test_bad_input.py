"""Bad input to every CLI, run as a real subprocess: one line on stderr ("PROG: error: ..."), exit status 2, no
traceback. Cases already covered elsewhere (test_infer: empty/binary/missing notes, malformed notes JSONL,
adapters with a fingerprint of another model or another code set; test_train_cli, test_evaluate,
test_prepare_*: their in-process errors) are not repeated here.

Non-UTF-8 input, by design: a note or text file (infer.py --note, --notes, the CodiEsp text files, the MIMIC
CSVs) is decoded with U+FFFD replacement characters and a warning, so one stray byte in thousands of notes does
not stop a run; a notes dataset read for training or evaluation (cec.data.read_notes) must be UTF-8, as JSON
requires, and a bad byte is an error naming the file and line."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import soak_batch as soak  # noqa: E402

SCRIPTS = {"infer.py": ROOT / "infer.py", "train.py": ROOT / "train.py",
           **{name: ROOT / "scripts" / name for name in ("build_concepts.py", "prepare_codiesp.py",
                                                         "prepare_mimic3.py", "evaluate.py")}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny pipeline (no adapters), another tiny base model (same layer names, other widths), adapters,
    notes, a stopped training run to resume, and small CodiEsp / MIMIC-III releases."""
    from cec.coding.concepts import ConceptSet
    from cec.data import write_notes
    from cec.engine.lora import inject_lora, save_adapter
    from cec.engine.weights import load_model

    d = tmp_path_factory.mktemp("bad_input")
    tok = soak.tiny_tokenizer()
    pipe = soak.write_tiny_pipeline(d / "pipe", max_note_tokens=128, tokenizer=tok)
    other = soak.write_tiny_model(d / "other_model", tokenizer=tok, hidden_size=32, intermediate_size=64, head_dim=8,
                                  query_pre_attn_scalar=8)
    cs = soak.tiny_concept_set()
    for name, folder, meta in (("other_adapter", other, None), ("codes_adapter", pipe / "model", {
            "concept_set_codes": cs.codes})):
        model, _ = load_model(folder)
        save_adapter(model, d / name, inject_lora(model, "all-linear", r=2, alpha=4), meta=meta)
    (d / "other_adapter" / "cec_adapter.json").unlink()  # a PEFT adapter without our fingerprint: shapes decide
    z = lambda m: {"Z" + c: v for c, v in m.items()}  # noqa: E731
    ConceptSet("renamed", cs.code_system, ["Z" + c for c in cs.codes], z(cs.descriptions), z(cs.parents),
               cs.concepts, z(cs.parent_ids), z(cs.leaf_ids)).save(d / "renamed_codes.json")
    notes = soak.generate_notes(6)
    write_notes(d / "train.jsonl", notes[:4])
    write_notes(d / "dev.jsonl", notes[4:])
    (d / "note.txt").write_text(notes[0]["text"])
    return SimpleNamespace(root=d, pipe=pipe, model=pipe / "model", concepts=pipe / "concepts.json", other=other,
                           train=d / "train.jsonl", dev=d / "dev.jsonl", note=d / "note.txt", tok=tok)


@pytest.fixture(scope="module")
def stopped_run(kit):
    """A concept-stage run of the tiny model stopped after step 1 (its checkpoint is what --resume reads)."""
    import train

    out = kit.root / "stopped_run"
    train.main(train_args(kit, out, "--steps", "3", "--stop-at", "1"))
    assert (out / "checkpoints" / "step-000001" / "trainer_state.pt").is_file()
    return out


def train_args(kit, out, *extra):
    return ["--stage", "concept", "--data", str(kit.train), "--concepts", str(kit.concepts), "--model",
            str(kit.model), "--out", str(out), "--lora-r", "2", "--max-questions", "4", "--max-tokens", "512",
            "--grad-accum", "1", "--no-progress", *map(str, extra)]


def run_cli(prog, *args, cwd, stdin=None, timeout=300):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                        "CEC_CACHE": str(Path(cwd) / "cec_cache")}
    return subprocess.run([sys.executable, str(SCRIPTS[prog]), *map(str, args)], input=stdin, capture_output=True,
                          env=env, cwd=cwd, timeout=timeout)


def assert_one_line_error(proc, prog, pattern):
    """Exit 2; the only line that mentions an error is the last one, `PROG: error: ...pattern...`; no traceback
    (log lines such as '[cec] loaded ...' may come before it)."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], err
    assert re.match(rf"{re.escape(prog)}: error: .*{pattern}", lines[-1]), err


# ---------------------------------------------------------------------------------------------------------
# The matrix: case name -> (kit, tmp, request) -> (program, argv, expected message pattern)
# ---------------------------------------------------------------------------------------------------------
CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def truncated_copy(folder: Path, dest: Path, name: str, keep: float = 0.5) -> Path:
    shutil.copytree(folder, dest)
    data = (dest / name).read_bytes()
    (dest / name).write_bytes(data[: int(len(data) * keep)])
    return dest


def corrupt_gguf(path: Path) -> Path:
    """A GGUF magic and version, then a header that claims 2**40 tensors and garbage after it."""
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + os.urandom(200))
    return path


# -- infer.py -------------------------------------------------------------------------------------------------
@case("infer-notes-binary")
def _(k, tmp, request):
    p = tmp / "notes.jsonl"
    p.write_bytes(b'{"id": "a", "text": "fever"}\n\x89PNG\x00\x01\x02\n')
    return "infer.py", ["--pipeline", k.pipe, "--notes", p, "--out", tmp / "o.jsonl"], r"notes\.jsonl:2: binary data"


@case("infer-note-is-a-folder")
def _(k, tmp, request):
    return "infer.py", ["--pipeline", k.pipe, "--note", tmp], r"is a directory, expected a text file"


@case("infer-model-truncated-safetensors")
def _(k, tmp, request):
    model = truncated_copy(k.model, tmp / "model", "model.safetensors")
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--model", model], \
        r"corrupt or truncated safetensors file .*model\.safetensors"


@case("infer-model-corrupt-gguf")
def _(k, tmp, request):
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--model", corrupt_gguf(tmp / "m.gguf")], \
        r"cannot read GGUF file .*m\.gguf"


@case("infer-model-not-gguf")
def _(k, tmp, request):
    """A text file named .gguf: one line saying so, not gguf's numpy error (issue 16, bug 5)."""
    (tmp / "m.gguf").write_bytes(b"ab")
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--model", tmp / "m.gguf"], \
        r"m\.gguf: not a GGUF file \(it does not start with the GGUF magic bytes\)$"


@case("infer-notes-unterminated-string")
def _(k, tmp, request):
    """'Unterminated string starting at column 21', not '... at at column 21' (issue 16, bug 5)."""
    (tmp / "notes.jsonl").write_text('{"id": "a", "text": "fever')
    return "infer.py", ["--pipeline", k.pipe, "--notes", tmp / "notes.jsonl", "--out", tmp / "o.jsonl"], \
        r"notes\.jsonl:1: invalid JSON \(Unterminated string starting at column 21\)$"


@case("infer-model-config-not-json")
def _(k, tmp, request):
    shutil.copytree(k.model, tmp / "model")
    (tmp / "model" / "config.json").write_bytes(b"\xff\xfe{garbage")
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--model", tmp / "model"], \
        r"config\.json.*(not valid UTF-8|invalid JSON)"


@case("infer-concepts-malformed-json")
def _(k, tmp, request):
    (tmp / "cs.json").write_text('{"format": "cec-concept-set/1",\n "codes": {,\n}')
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--concepts", tmp / "cs.json"], \
        r"cs\.json: invalid JSON \(.* at line 2\)"


@case("infer-pipeline-malformed-json")
def _(k, tmp, request):
    (tmp / "pipe").mkdir()
    (tmp / "pipe" / "cec_pipeline.json").write_text('{"base_model": "m",\n "threshold": }\n')
    return "infer.py", ["--pipeline", tmp / "pipe", "--note", k.note], r"cec_pipeline\.json: malformed .*line 2"


@case("infer-adapter-for-another-base-model")
def _(k, tmp, request):
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--concept-adapter", k.root / "other_adapter"], \
        r"other_adapter: .*(another base model|shape)"


@case("infer-adapter-config-malformed")
def _(k, tmp, request):
    shutil.copytree(k.root / "codes_adapter", tmp / "adapter")
    (tmp / "adapter" / "adapter_config.json").write_text('{"r": 2,')
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--label-adapter", tmp / "adapter"], \
        r"adapter_config\.json: unreadable"


@case("infer-out-under-a-file")
def _(k, tmp, request):
    (tmp / "file").write_text("x")
    return "infer.py", ["--pipeline", k.pipe, "--notes", k.train, "--out", tmp / "file" / "preds.jsonl"], \
        r"cannot write .*preds\.jsonl: .*file is a file, not a folder"


# -- train.py -------------------------------------------------------------------------------------------------
@case("train-data-is-a-folder")
def _(k, tmp, request):
    return "train.py", ["--stage", "concept", "--data", tmp, "--concepts", k.concepts, "--out", tmp / "o"], \
        r"is a directory, expected a notes JSONL file"


@case("train-data-malformed-line")
def _(k, tmp, request):
    lines = k.train.read_text().splitlines()
    (tmp / "t.jsonl").write_text("\n".join(lines[:2] + ['{"id": "x", "text": "y", "labels": [}'] + lines[2:]))
    return "train.py", train_args(k, tmp / "o", "--data", tmp / "t.jsonl"), r"t\.jsonl:3: invalid JSON"


@case("train-data-binary")
def _(k, tmp, request):
    (tmp / "t.jsonl").write_bytes(k.train.read_bytes()[:40] + b"\x00\x01\x02\xff\xd8\n")
    return "train.py", train_args(k, tmp / "o", "--data", tmp / "t.jsonl"), r"t\.jsonl:1: "


@case("train-data-not-utf8")
def _(k, tmp, request):
    (tmp / "t.jsonl").write_bytes(k.train.read_bytes() + b'{"id": "z", "text": "caf\xe9", "labels": []}\n')
    return "train.py", train_args(k, tmp / "o", "--data", tmp / "t.jsonl"), r"t\.jsonl:5: not valid UTF-8"


@case("train-data-empty")
def _(k, tmp, request):
    (tmp / "t.jsonl").write_text("\n\n")
    return "train.py", train_args(k, tmp / "o", "--data", tmp / "t.jsonl"), r"t\.jsonl: no notes"


@case("train-data-unknown-code")
def _(k, tmp, request):
    (tmp / "t.jsonl").write_text(json.dumps({"id": "a", "text": "fever", "labels": ["R50.9", "Q99.9"]}) + "\n")
    return "train.py", train_args(k, tmp / "o", "--data", tmp / "t.jsonl"), \
        r"t\.jsonl: note 'a': code 'Q99\.9' is not in concept set"


@case("train-dev-malformed-line")
def _(k, tmp, request):
    (tmp / "dev.jsonl").write_text(k.dev.read_text() + "[1, 2]\n")
    return "train.py", train_args(k, tmp / "o", "--dev", tmp / "dev.jsonl"), r"dev\.jsonl:3: expected a JSON object"


@case("train-concepts-malformed-json")
def _(k, tmp, request):
    (tmp / "cs.json").write_text(k.concepts.read_text()[:300])
    return "train.py", train_args(k, tmp / "o", "--concepts", tmp / "cs.json"), r"cs\.json: invalid JSON .* at line"


@case("train-concepts-binary")
def _(k, tmp, request):
    (tmp / "cs.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return "train.py", train_args(k, tmp / "o", "--concepts", tmp / "cs.json"), r"cs\.json"


@case("train-model-missing-folder")
def _(k, tmp, request):
    return "train.py", train_args(k, tmp / "o", "--model", tmp / "no" / "model"), r"no such model"


@case("train-model-truncated-safetensors")
def _(k, tmp, request):
    model = truncated_copy(k.model, tmp / "model", "model.safetensors", keep=0.9)
    return "train.py", train_args(k, tmp / "o", "--model", model), r"corrupt or truncated safetensors"


@case("train-model-corrupt-gguf")
def _(k, tmp, request):
    return "train.py", train_args(k, tmp / "o", "--model", corrupt_gguf(tmp / "m.gguf")), r"cannot read GGUF file"


@case("train-resume-with-another-base-model")
def _(k, tmp, request):
    run = request.getfixturevalue("stopped_run")
    shutil.copytree(run, tmp / "run")
    return "train.py", train_args(k, tmp / "run", "--steps", "3", "--resume", "--model", k.other), \
        r"checkpoint .*step-000001.* another base model"


@case("train-resume-with-another-concept-set")
def _(k, tmp, request):
    run = request.getfixturevalue("stopped_run")
    shutil.copytree(run, tmp / "run")
    return "train.py", train_args(k, tmp / "run", "--steps", "3", "--resume", "--concepts",
                                  k.root / "renamed_codes.json", "--drop-unknown-codes"), \
        r"checkpoint .*step-000001 was made for concept_set 'soak-tiny', this run has 'renamed'"


@case("infer-adapter-trained-for-another-concept-set")
def _(k, tmp, request):
    """train.py records the codes an adapter was trained for; infer.py refuses it with another concept set."""
    run = request.getfixturevalue("stopped_run")
    adapter = tmp / "adapter"
    shutil.copytree(run / "checkpoints" / "step-000001", adapter)
    return "infer.py", ["--pipeline", k.pipe, "--note", k.note, "--concepts", k.root / "renamed_codes.json",
                        "--concept-adapter", adapter], r"adapter: adapter was trained for another code set"


@case("train-resume-from-a-corrupt-checkpoint")
def _(k, tmp, request):
    run = request.getfixturevalue("stopped_run")
    truncated_copy(run, tmp / "run", "checkpoints/step-000001/trainer_state.pt")
    return "train.py", train_args(k, tmp / "run", "--steps", "3", "--resume"), \
        r"checkpoint .*step-000001.*unreadable"


# -- build_concepts.py ------------------------------------------------------------------------------------------
def raw_candidates() -> dict:
    cs = soak.tiny_concept_set()
    return {"code_system": "icd10cm", "code_set": "t", "batches": [], "failures": [], "codes": {
        c: {"description": cs.descriptions[c], "parent": {"code": cs.parents[c][0], "description": cs.parents[c][1]},
            "parent_concepts": [x.text for x in cs.concepts_of(c, "parent")],
            "leaf_concepts": [x.text for x in cs.concepts_of(c, "leaf")]} for c in cs.codes}}


@case("build-raw-malformed-json")
def _(k, tmp, request):
    (tmp / "raw.json").write_text(json.dumps(raw_candidates(), indent=1)[:-40])
    return "build_concepts.py", ["--raw", tmp / "raw.json", "--out", tmp / "o.json"], \
        r"raw\.json: invalid JSON \(.* at line \d+\)"


@case("build-raw-binary")
def _(k, tmp, request):
    (tmp / "raw.json").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    return "build_concepts.py", ["--raw", tmp / "raw.json", "--out", tmp / "o.json"], r"raw\.json"


@case("build-raw-is-a-built-set")
def _(k, tmp, request):
    return "build_concepts.py", ["--raw", k.concepts, "--out", tmp / "o.json"], r"already a built concept set"


@case("build-codes-unknown-code")
def _(k, tmp, request):
    (tmp / "codes.txt").write_text("I10\nA99.9\n")
    return "build_concepts.py", ["--codes", tmp / "codes.txt", "--code-system", "icd10cm", "--backend", "http",
                                 "--url", "http://127.0.0.1:9/v1", "--model", "m", "--raw", tmp / "raw.json",
                                 "--out", tmp / "o.json"], r"no description for 'A99\.9' in icd10cm"


@case("build-codes-not-a-code")
def _(k, tmp, request):
    (tmp / "codes.txt").write_text("I10\nhypertension\n")
    return "build_concepts.py", ["--codes", tmp / "codes.txt", "--code-system", "icd10cm", "--backend", "http",
                                 "--url", "http://127.0.0.1:9/v1", "--model", "m", "--raw", tmp / "raw.json",
                                 "--out", tmp / "o.json"], r"codes\.txt:2: not an ICD-10-CM code: 'hypertension'"


@case("build-codes-not-a-range")
def _(k, tmp, request):
    (tmp / "codes.tsv").write_text("code\tdescription\n401.9\tHypertension\nfoo-bar\tSomething\n")
    return "build_concepts.py", ["--codes", tmp / "codes.tsv", "--code-system", "icd9cm", "--backend", "http",
                                 "--url", "http://127.0.0.1:9/v1", "--model", "m", "--raw", tmp / "raw.json",
                                 "--out", tmp / "o.json"], r"codes\.tsv:3: not an ICD-9-CM code: 'FOO'"


@case("build-out-under-a-file")
def _(k, tmp, request):
    (tmp / "raw.json").write_text(json.dumps(raw_candidates()))
    (tmp / "file").write_text("x")
    return "build_concepts.py", ["--raw", tmp / "raw.json", "--out", tmp / "file" / "set.json"], \
        r"cannot write .*set\.json: .*file is a file, not a folder"


# -- prepare_codiesp.py -------------------------------------------------------------------------------------------
def codiesp_release(root: Path) -> Path:
    src = root / "codiesp"
    (src / "train" / "text_files_en").mkdir(parents=True)
    for doc, text in (("t1", "Fever and cough.\n"), ("t2", "Chest pain at rest.\n")):
        (src / "train" / "text_files_en" / f"{doc}.txt").write_text(text)
    (src / "train" / "trainD.tsv").write_text("t1\tr50.9\nt1\tr05\nt2\ti20.9\n")
    return src


@case("codiesp-binary-text-file")
def _(k, tmp, request):
    src = codiesp_release(tmp)
    (src / "train" / "text_files_en" / "t2.txt").write_bytes(b"\x89PNG\x00\x00garbage")
    return "prepare_codiesp.py", ["--src", src, "--out", tmp / "o"], r"t2\.txt: binary file"


@case("codiesp-empty-text-file")
def _(k, tmp, request):
    src = codiesp_release(tmp)
    (src / "train" / "text_files_en" / "t1.txt").write_text("  \n")
    return "prepare_codiesp.py", ["--src", src, "--out", tmp / "o"], r"t1\.txt: empty text file"


@case("codiesp-codes-missing")
def _(k, tmp, request):
    return "prepare_codiesp.py", ["--src", codiesp_release(tmp), "--out", tmp / "o", "--codes", tmp / "codes.txt"], \
        r"codes\.txt: no such file"


@case("codiesp-out-is-a-file")
def _(k, tmp, request):
    (tmp / "out").write_text("x")
    return "prepare_codiesp.py", ["--src", codiesp_release(tmp), "--out", tmp / "out"], r"out.*(File exists|Not a dir)"


# -- prepare_mimic3.py ----------------------------------------------------------------------------------------------
NOTE_HEADER = "ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CATEGORY,DESCRIPTION,TEXT\n"
CODE_HEADER = "ROW_ID,SUBJECT_ID,HADM_ID,SEQ_NUM,ICD9_CODE\n"


def mimic_release(root: Path, notes: bytes | None = None, gz: bool = False) -> tuple[Path, Path]:
    """(MIMIC folder, splits folder) for the 'full' set: admissions 100 (train), 200 (dev), 300 (test)."""
    mimic, splits = root / "mimic", root / "splits"
    (splits / "caml").mkdir(parents=True)
    mimic.mkdir()
    rows = b"".join(b'%d,1,%d,2100-01-01,Discharge summary,Report,"Invented note %d: fever."\n' % (i, h, h)
                    for i, h in enumerate((100, 200, 300)))
    data = NOTE_HEADER.encode() + (rows if notes is None else notes)
    (mimic / ("NOTEEVENTS.csv.gz" if gz else "NOTEEVENTS.csv")).write_bytes(gzip.compress(data) if gz else data)
    (mimic / "DIAGNOSES_ICD.csv").write_text(CODE_HEADER + "1,1,100,1,4019\n2,1,200,1,4019\n3,1,300,1,486\n")
    (mimic / "PROCEDURES_ICD.csv").write_text(CODE_HEADER)
    for split, h in (("train", 100), ("dev", 200), ("test", 300)):
        (splits / "caml" / f"{split}_full_hadm_ids.csv").write_text(f"{h}\n")
    return mimic, splits


def mimic_args(mimic, splits, tmp):
    return ["--mimic", mimic, "--splits", splits, "--out", tmp / "o", "--sets", "full"]


@case("mimic-csv-binary-row")
def _(k, tmp, request):
    mimic, splits = mimic_release(tmp, notes=b'0,1,100,2100-01-01,Discharge summary,Report,"fever"\n1,1,200,\x00\x00\n')
    return "prepare_mimic3.py", mimic_args(mimic, splits, tmp), r"NOTEEVENTS\.csv:3: 4 fields, the header has 7"


@case("mimic-corrupt-gzip")
def _(k, tmp, request):
    mimic, splits = mimic_release(tmp, gz=True)
    (mimic / "NOTEEVENTS.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    return "prepare_mimic3.py", mimic_args(mimic, splits, tmp), r"NOTEEVENTS\.csv\.gz: "


@case("mimic-truncated-gzip")
def _(k, tmp, request):
    mimic, splits = mimic_release(tmp, gz=True)
    data = (mimic / "NOTEEVENTS.csv.gz").read_bytes()
    (mimic / "NOTEEVENTS.csv.gz").write_bytes(data[: len(data) // 2])
    return "prepare_mimic3.py", mimic_args(mimic, splits, tmp), r"NOTEEVENTS\.csv\.gz: .*(truncated|ended)"


@case("mimic-split-file-binary")
def _(k, tmp, request):
    mimic, splits = mimic_release(tmp)
    (splits / "caml" / "dev_full_hadm_ids.csv").write_bytes(b"\x00\x01\x02")
    return "prepare_mimic3.py", mimic_args(mimic, splits, tmp), r"dev_full_hadm_ids\.csv: binary file"


# -- evaluate.py ---------------------------------------------------------------------------------------------------
def evaluate_args(k, tmp, *extra):
    return ["--test", k.dev, "--dev", k.dev, "--pipeline", k.pipe, "--out", tmp / "t.md", "--systems", "cec-k3",
            *extra]


@case("evaluate-dev-malformed-line")
def _(k, tmp, request):
    (tmp / "dev.jsonl").write_text(k.dev.read_text() + '{"id": "q", "text": "x", "labels": [1]}\n')
    return "evaluate.py", ["--test", k.dev, "--dev", tmp / "dev.jsonl", "--pipeline", k.pipe, "--out", tmp / "t.md"], \
        r"dev\.jsonl:3: 'labels' must be a list"


@case("evaluate-test-not-utf8")
def _(k, tmp, request):
    (tmp / "test.jsonl").write_bytes(b'{"id": "a", "text": "\xe9t\xe9", "labels": []}\n')
    return "evaluate.py", ["--test", tmp / "test.jsonl", "--dev", k.dev, "--pipeline", k.pipe, "--out", tmp / "t.md"], \
        r"test\.jsonl:1: not valid UTF-8"


@case("evaluate-adapter-for-another-base-model")
def _(k, tmp, request):
    return "evaluate.py", evaluate_args(k, tmp, "--concept-adapter", k.root / "other_adapter"), \
        r"other_adapter: .*(another base model|shape)"


@case("evaluate-concept-set-codes-differ-from-adapter")
def _(k, tmp, request):
    test = tmp / "test.jsonl"
    test.write_text(json.dumps({"id": "a", "text": "fever", "labels": ["ZI10"]}) + "\n")
    return "evaluate.py", ["--test", test, "--dev", test, "--pipeline", k.pipe, "--out", tmp / "t.md", "--systems",
                           "cec-k3", "--concepts", k.root / "renamed_codes.json", "--label-adapter",
                           k.root / "codes_adapter"], r"codes_adapter: adapter was trained for another code set"


@case("evaluate-empty-test-file")
def _(k, tmp, request):
    (tmp / "test.jsonl").write_text("\n")
    return "evaluate.py", ["--test", tmp / "test.jsonl", "--dev", k.dev, "--pipeline", k.pipe, "--out", tmp / "t.md"], \
        r"no test notes"


@case("evaluate-out-under-a-file")
def _(k, tmp, request):
    (tmp / "file").write_text("x")
    return "evaluate.py", ["--test", k.dev, "--dev", k.dev, "--pipeline", k.pipe, "--out", tmp / "file" / "t.md"], \
        r"cannot write .*t\.md: .*file is a file, not a folder"


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_exit_2(kit, tmp_path, request, name):
    prog, argv, pattern = CASES[name](kit, tmp_path, request)
    proc = run_cli(prog, *argv, cwd=tmp_path)
    assert_one_line_error(proc, prog, pattern)
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "t.md").exists()


# ---------------------------------------------------------------------------------------------------------
# Inputs that are accepted, with a warning
# ---------------------------------------------------------------------------------------------------------
def run_with_peak(tmp: Path, *args) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, peak RSS in MB) of `infer.py ARGS`; the peak is the child's ru_maxrss."""
    with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
        child = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), *map(str, args)], stdout=out, stderr=err,
                                 env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return (child.returncode, (tmp / "stdout").read_text(), (tmp / "stderr").read_text(), usage.ru_maxrss / 1024)


def test_huge_note_is_cut_to_the_token_budget_with_a_warning_in_bounded_memory(kit, tmp_path):
    """1M characters (about 1,500 notes' worth of sections) becomes a prefix of about max_note_tokens (128)
    tokens, with a warning; the peak memory stays within 300 MB of coding a short note."""
    from cec.coding import prompts
    huge = "".join(n["text"] + "\n" for n in soak.generate_notes(2000, seed=3))[:1_000_000]
    (tmp_path / "huge.txt").write_text(huge)
    rc, out, err, huge_mb = run_with_peak(tmp_path, "--pipeline", kit.pipe, "--note", tmp_path / "huge.txt",
                                          "--format", "json")
    assert rc == 0 and "Traceback" not in err, err
    assert re.search(r"note of \d+ tokens is longer than 128: kept \d+ tokens \([\d.]+%\)", err), err
    doc = json.loads(out)
    assert doc["truncation"]["kept_tokens"] < doc["truncation"]["note_tokens"]
    assert len(doc["note"]) == 1_000_000  # the output keeps the note as given
    assert doc["timing"]["prefix_tokens"] <= 128 + len(kit.tok.encode(prompts.concept_prefix("")))
    rc, _, err, short_mb = run_with_peak(tmp_path, "--pipeline", kit.pipe, "--note", kit.note, "--format", "json")
    assert rc == 0, err
    assert huge_mb - short_mb < 300, (huge_mb, short_mb)


def test_training_on_a_huge_note_cuts_its_tail_with_a_warning_in_bounded_memory(kit, tmp_path):
    """A 1M-character training note is packed up to --max-tokens (its tail cut, reported); the process stays far
    below what attention over the whole note would need."""
    from cec.data import write_notes

    huge = "".join(n["text"] + "\n" for n in soak.generate_notes(2000, seed=4))[:1_000_000]
    write_notes(tmp_path / "huge.jsonl", [{"id": "huge", "text": huge, "labels": ["I10"]}])
    with open(tmp_path / "stderr", "wb") as err:
        child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(kit, tmp_path / "run", "--data",
                                  tmp_path / "huge.jsonl", "--steps", "1", "--max-tokens", "256")],
                                 stdout=subprocess.DEVNULL, stderr=err, env=os.environ | {
                                     "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(child.pid, 0)
    err = (tmp_path / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, err
    assert "1 notes were longer than --max-tokens allows; their tails were cut" in err, err
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert usage.ru_maxrss / 1024 < 1500, usage.ru_maxrss


def test_non_utf8_notes_jsonl_is_decoded_with_a_warning_naming_file_and_line(kit, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"id": "a", "text": "fever"}\n{"id": "b", "text": "caf\xe9 au lait spots"}\n')
    proc = run_cli("infer.py", "--pipeline", kit.pipe, "--notes", notes, "--out", tmp_path / "o.jsonl",
                   cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert re.search(r"^infer\.py: warning: .*notes\.jsonl:2: not valid UTF-8", err, re.M), err
    assert [json.loads(ln)["id"] for ln in (tmp_path / "o.jsonl").read_text().splitlines()] == ["a", "b"]


def test_non_utf8_codiesp_text_and_mimic_csv_are_decoded_with_a_warning(tmp_path):
    src = codiesp_release(tmp_path)
    (src / "train" / "text_files_en" / "t2.txt").write_bytes(b"Caf\xe9 au lait spots.\n")
    proc = run_cli("prepare_codiesp.py", "--src", src, "--out", tmp_path / "codiesp_out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "t2.txt: not valid UTF-8" in proc.stderr.decode()
    note = [json.loads(ln) for ln in (tmp_path / "codiesp_out" / "train.jsonl").read_text().splitlines()][1]
    assert note["text"] == "Caf\ufffd au lait spots."

    mimic, splits = mimic_release(tmp_path / "m", notes=b"".join(
        b'%d,1,%d,2100-01-01,Discharge summary,Report,"Invented note \xe9 %d"\n' % (i, h, h)
        for i, h in enumerate((100, 200, 300))))
    proc = run_cli("prepare_mimic3.py", *mimic_args(mimic, splits, tmp_path / "m"), cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert re.search(r"NOTEEVENTS\.csv: 3 rows? .*not valid UTF-8", err), err
    texts = [json.loads(ln)["text"] for ln in (tmp_path / "m" / "o" / "mimic3-full" / "dev.jsonl").read_text()
             .splitlines()]
    assert texts == ["Invented note \ufffd 200"]


def test_a_notes_file_with_a_byte_order_mark_is_read(kit, tmp_path):
    """Editors on Windows save UTF-8 with a BOM; train.py and evaluate.py read such a file like any other."""
    from cec.data import read_notes

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + kit.train.read_bytes())
    assert read_notes(bom) == read_notes(kit.train)
