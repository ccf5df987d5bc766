"""Safety: nothing is ever unpickled from a user's file (weights and adapters load from safetensors or GGUF only;
our own optimizer checkpoints load with weights_only=True); the HTTP generator's API key never reaches a log,
a saved reply or an output; the HTML report renders any note as text."""
import ast
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import soak_batch as soak  # noqa: E402

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
SOURCES = [*sorted((ROOT / "cec").rglob("*.py")), ROOT / "infer.py", ROOT / "train.py",
           *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "kernels").glob("*.py"))]


pytestmark = pytest.mark.usefixtures("one_thread")



def run(script, *args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          env=env or ENV, cwd=cwd, timeout=300)


# ---------------------------------------------------------------------------------------------------------
# No unpickling
# ---------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs os.mkdir(marker): proof that a loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    pipe = soak.write_tiny_pipeline(d / "pipe", max_note_tokens=128)
    (d / "note.txt").write_text(soak.generate_notes(1)[0]["text"])
    return d, pipe


def assert_refused(proc, prog, pattern, marker: Path):
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert re.match(rf"{prog}: error: .*{pattern}", err.strip().splitlines()[-1]), err
    assert not marker.exists(), "the pickle was executed"


def test_pickled_weights_are_refused_without_being_opened(tiny, tmp_path):
    d, pipe = tiny
    marker = tmp_path / "pwned"
    weights = tmp_path / "model.bin"
    weights.write_bytes(pickle.dumps(Payload(marker)))
    proc = run("infer.py", "--pipeline", pipe, "--note", d / "note.txt", "--model", weights)
    assert_refused(proc, r"infer\.py", r"refusing to load pickled weights .*model\.bin.*safetensors or GGUF", marker)

    folder = tmp_path / "hf_folder"  # an HF folder with only pytorch_model.bin: never torch.load-ed
    folder.mkdir()
    (folder / "config.json").write_text((pipe / "model" / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    proc = run("train.py", "--stage", "concept", "--data", soak_notes(tmp_path), "--concepts", pipe / "concepts.json",
               "--model", folder, "--out", tmp_path / "run", "--steps", 1, "--no-progress")
    assert_refused(proc, r"train\.py", r"only pickled weights \(pytorch_model\.bin\).*safetensors or GGUF", marker)


def soak_notes(tmp_path: Path) -> Path:
    from cec.data import write_notes

    write_notes(tmp_path / "train.jsonl", soak.generate_notes(2))
    return tmp_path / "train.jsonl"


def test_pickled_adapters_are_refused_without_being_opened(tiny, tmp_path):
    d, pipe = tiny
    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload(marker)},
               adapter / "adapter_model.bin")
    proc = run("infer.py", "--pipeline", pipe, "--note", d / "note.txt", "--label-adapter", adapter)
    assert_refused(proc, r"infer\.py", r"only adapter_model\.safetensors is accepted", marker)


def test_a_checkpoint_state_that_would_run_code_is_refused(tiny, tmp_path):
    """trainer_state.pt is ours and loads with weights_only=True: a planted one cannot run code on --resume."""
    import train

    d, pipe = tiny
    args = ["--stage", "concept", "--data", str(soak_notes(tmp_path)), "--concepts", str(pipe / "concepts.json"),
            "--model", str(pipe / "model"), "--out", str(tmp_path / "run"), "--steps", "2", "--lora-r", "2",
            "--grad-accum", "1", "--max-questions", "3", "--no-progress"]
    train.main(args + ["--stop-at", "1"])
    marker = tmp_path / "pwned"
    state = tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.pt"
    torch.save({"step": 1, "optimizer": Payload(marker)}, state)
    proc = run("train.py", *args, "--resume")
    assert_refused(proc, r"train\.py", r"checkpoint .*step-000001: unreadable trainer_state\.pt", marker)


def calls_in(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            yield node, "import " + " ".join(n for n in names if n)


def test_no_code_path_unpickles():
    """torch.load only with weights_only=True; no pickle, dill, joblib, np.load(allow_pickle=True), or
    torch.load of a file the user names."""
    bad = []
    for path in SOURCES:
        rel = path.relative_to(ROOT)
        for node, name in calls_in(path):
            if name.endswith("torch.load"):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                        and weights_only[0].value.value is True):
                    bad.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
            elif name.startswith("import") and re.search(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\b", name):
                bad.append(f"{rel}:{node.lineno} {name}")
            elif name.endswith(("np.load", "numpy.load")) and any(
                    k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords):
                bad.append(f"{rel}:{node.lineno} np.load(allow_pickle=True)")
            elif name.endswith(("pickle.load", "pickle.loads", "torch.jit.load")):
                bad.append(f"{rel}:{node.lineno} {name}")
    assert not bad, bad
    loads = [(p.relative_to(ROOT), n.lineno) for p in SOURCES for n, name in calls_in(p) if name.endswith("torch.load")]
    assert loads == [(Path("cec/training/checkpoint.py"), loads[0][1])]  # the one torch.load: our own trainer_state.pt


# ---------------------------------------------------------------------------------------------------------
# The HTTP generator's API key
# ---------------------------------------------------------------------------------------------------------
KEY = "sk-live-7f3Q9xZ2kP0wL5vN8rT1"


class EchoServer:
    """A chat-completions endpoint that puts the Authorization header it receives everywhere it can: a 500's
    body first (retried), then in a concept phrase, the prose of the reply and a code fence."""

    def __init__(self):
        self.auth, self.calls = [], 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                server.auth.append(auth)
                server.calls += 1
                if server.calls == 1:
                    status, payload = 500, {"error": {"message": f"upstream failed for {auth}"}}
                else:
                    prompt = body["messages"][0]["content"]
                    items = eval(prompt.split("#### Input :\n", 1)[1].split("\nOutput Format", 1)[0])  # noqa: S307
                    reply = [{it["leaf_code"][0]: [f"finding {i} of {it['leaf_code'][0]}", f"key {auth}"]}
                             for i, it in enumerate(items)]
                    content = f"Authorization was {auth}.\n```json\n{json.dumps(reply)}\n```\n(sent with {auth})"
                    status, payload = 200, {"choices": [{"message": {"content": content}}]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


class OneHotEmbedder:
    """Stands in for MiniLM: every distinct phrase its own direction, so nothing merges."""

    def encode(self, phrases, **kw):
        import numpy as np

        return np.eye(len(phrases), dtype=np.float32)


def test_the_api_key_never_reaches_logs_saved_replies_or_outputs(tmp_path, monkeypatch, caplog, capsys):
    from cec.coding.concepts import ChatCompletionsBackend, build_concept_set, generate_candidates, read_candidates

    monkeypatch.setenv("CEC_API_KEY", KEY)
    entries = {code: {"description": f"disease {code}", "parent": {"code": code[:3], "description": "group"},
                      "parent_concepts": [], "leaf_concepts": []} for code in ("I10", "E11.9", "J18.9")}
    server = EchoServer()
    try:
        backend = ChatCompletionsBackend(server.url, "m", retries=2, backoff=0.01)
        with caplog.at_level(logging.DEBUG):
            raw = generate_candidates(entries, backend, tmp_path / "set.raw.json", code_system="icd10cm",
                                      code_set="t")
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    build_concept_set(read_candidates(tmp_path / "set.raw.json"), embedder=OneHotEmbedder()).save(tmp_path / "set.json")
    assert server.auth and all(a == f"Bearer {KEY}" for a in server.auth)  # the key was sent...
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 500" in logged and "[API key]" in logged  # ...the failed call was logged, redacted
    assert KEY not in logged and KEY not in "".join(capsys.readouterr())
    assert all(raw["codes"][c]["leaf_concepts"] for c in entries) and not raw["failures"]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"set.raw.json", "set.json", "000-parent-try1.txt", "001-leaf-try1.txt"}
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    assert "[API key]" in (tmp_path / "set.raw.replies" / "000-parent-try1.txt").read_text()


# ---------------------------------------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------------------------------------
class Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = set(), set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs |= {name for name, _ in attrs}

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    parser = Tags()
    parser.feed(page)
    parser.close()
    return parser


def report_doc(note: str, concepts: list[str], description: str) -> dict:
    codes = [{"code": f"C{i}<", "description": description, "probability": 0.9 - i / 10, "predicted": True,
              "evidence": [{"concept": c, "level": "leaf", "probability": 0.8}]} for i, c in enumerate(concepts)]
    return {"note": note, "code_system": "icd10cm", "threshold": 0.5, "codes": codes,
            "timing": {"prefix_tokens": 10, "questions": 5, "seconds": 0.1}}


MARKUP = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"><svg onload=alert(1)>", "'", "&amp;",
          "</mark>", "<!--", "-->", "]]>", "javascript:alert(1)", "<style>*{}</style>", "&#x3c;script&#x3e;",
          "<a href='//evil'>", "\u2028", "\x00"]
WORDS = ["fever", "cough", "chest", "pain", "renal", "failure", "blood", "pressure", "high", "glucose", ".", "\n"]
fragment = st.sampled_from(MARKUP + WORDS) | st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
                                                      max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(note=st.lists(fragment, min_size=1, max_size=40).map(" ".join),
       concepts=st.lists(st.lists(fragment, min_size=1, max_size=4).map(" ".join), min_size=1, max_size=3),
       description=fragment, note_id=fragment)
def test_report_renders_any_note_concept_or_description_as_text(note, concepts, description, note_id):
    from cec.coding.report import render_report

    baseline = parse(render_report(report_doc("Fever and cough. High blood pressure.", ["fever", "blood pressure"],
                                              "Fever")))
    got = parse(render_report(report_doc(note, concepts, description), note_id=note_id))
    assert got.tags <= baseline.tags, got.tags - baseline.tags  # no element the template does not make itself
    assert got.attrs <= baseline.attrs, got.attrs - baseline.attrs  # no onerror=, href=, src=...
    text = "".join(got.text)
    for piece in MARKUP[:3]:
        if piece in note:
            assert piece in text  # the markup shows as text


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium to render the report in")
def test_chromium_runs_no_handler_injected_through_the_note_or_the_concepts(tmp_path):
    """The existing <script> check (test_report) covers a script element; this one covers attribute handlers
    and a closing tag in the note, a concept and a code description."""
    from cec.coding.report import write_report

    evil = "document.title='pwned'"
    note = (f'Fever.\n"><img src=x onerror="{evil}"></mark><svg onload="{evil}">\nHigh blood pressure.\n'
            f"<body onload=\"{evil}\">Cough.")
    doc = report_doc(note, ["fever", f'pressure"><img src=x onerror="{evil}">'], f"Fever</title><b onclick=\"{evil}\">")
    write_report(tmp_path / "r.html", doc, note_id=f"<img src=x onerror=\"{evil}\">")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=2000", "--dump-dom", (tmp_path / "r.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title and title[1].startswith("CEC coding report"), out.stderr[-2000:]  # no handler renamed the page
    elements = parse(dom)
    assert not elements.tags & {"img", "svg", "script", "b"}, elements.tags
    assert not [a for a in elements.attrs if a.startswith("on")], elements.attrs
    assert "pwned" in "".join(elements.text)  # the injected text is on the page, as text
