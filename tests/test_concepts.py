import ast
import json
import runpy
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cec.coding.concepts import (LEAF_INSTRUCTION, OUTPUT_FORMAT, PARENT_INSTRUCTION, ChatCompletionsBackend,
                          ConceptSet, GeneratorError, LocalModelBackend, build_concept_set, build_prompt,
                          code_entries, dedup, generate_candidates, load_concept_set, parse_reply,
                          read_candidates, shipped_concept_sets, split_batches)
from cec.errors import DataError
from cec.coding.icd import icd9cm

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cec" / "resources" / "concepts"
KEY = "sk-test-SECRET-0123456789"


# -- a real chat-completions server on 127.0.0.1 -------------------------------------------------------------
class Server:
    """ThreadingHTTPServer whose answers come from `respond(request) -> (status, text_or_payload, headers)`."""

    def __init__(self, respond):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                req = {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                server.requests.append(req)
                status, answer, headers = respond(req)
                if isinstance(answer, str):
                    answer = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond):
        servers.append(Server(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def prompt_items(req) -> list[dict]:
    prompt = req["body"]["messages"][0]["content"]
    return ast.literal_eval(prompt.split("#### Input :\n", 1)[1].split("\nOutput Format", 1)[0])


def level_of(req) -> str:
    return "parent" if PARENT_INSTRUCTION in req["body"]["messages"][0]["content"] else "leaf"


def good_answer(req, skip=()):
    """A Python-style reply with prose and a code fence, concepts derived from each code's description."""
    level = level_of(req)
    items = [{it["leaf_code"][0]: [f"{level} {it['leaf_code'][1].lower()}", f"{level} sign of {it['leaf_code'][0]}"]}
             for it in prompt_items(req) if it["leaf_code"][0] not in skip]
    return f"Here are the concepts:\n```python\n{items!r}\n```\nLet me know if you need more."


ENTRIES = {
    "401.9": {"description": "Unspecified essential hypertension",
              "parent": {"code": "401", "description": "Essential hypertension"}},
    "96.71": {"description": "Continuous mechanical ventilation for less than 96 consecutive hours",
              "parent": {"code": "96.7", "description": "Other continuous mechanical ventilation"}},
    "967.1": {"description": "Poisoning by chloral hydrate group",
              "parent": {"code": "967", "description": "Poisoning by sedatives and hypnotics"}},
}


def entries(n=3):
    return {c: {**e, "parent_concepts": [], "leaf_concepts": []} for c, e in list(ENTRIES.items())[:n]}


# -- prompts and batches ---------------------------------------------------------------------------------------
def test_prompts_are_the_papers_figures(shared_dir):
    paper = (shared_dir / "paper" / "cec-paper.md").read_text()
    for text in (PARENT_INSTRUCTION, LEAF_INSTRUCTION, OUTPUT_FORMAT):
        assert text in paper
    prompt = build_prompt("parent", [{"code": c, **e} for c, e in ENTRIES.items()])
    assert prompt.startswith("#### Instruction :\n" + PARENT_INSTRUCTION + "\n#### Input :\n[{'leaf_code': ")
    assert prompt.endswith(OUTPUT_FORMAT + "\n#### Response :\n")
    items = ast.literal_eval(prompt.split("#### Input :\n")[1].split("\nOutput Format")[0])
    assert items[1] == {"leaf_code": ("96.71", ENTRIES["96.71"]["description"]),
                        "parent_code": ("96.7", "Other continuous mechanical ventilation")}
    assert LEAF_INSTRUCTION in build_prompt("leaf", [{"code": "401.9", **ENTRIES["401.9"]}])


def test_split_batches():
    codes = [str(i) for i in range(50)]
    assert [len(b) for b in split_batches(codes)] == [7, 7, 6, 6, 6, 6, 6, 6]
    assert sum(split_batches(codes), []) == codes
    assert [len(b) for b in split_batches(codes[:12])] == [6, 6]
    assert [len(b) for b in split_batches(codes[:5])] == [5]
    assert split_batches([]) == []


def test_shipped_raw_batches_follow_the_same_split():
    raw = read_candidates(SHIPPED / "raw" / "mimic3-50.json")
    parent = [b["codes"] for b in raw["batches"] if b["prompt"] == "parent"]
    assert parent == split_batches(list(raw["codes"]))


# -- reply parsing ---------------------------------------------------------------------------------------------
CODES = ["401.9", "96.71", "967.1"]


@pytest.mark.parametrize("reply,expected", [
    ('[{"401.9": ["high blood pressure", "BP meds"]}, {"96.71": ["ventilator"]}]',
     {"401.9": ["high blood pressure", "BP meds"], "96.71": ["ventilator"]}),
    ("[{'401.9' : [\"patient's blood pressure\", 'amlodipine']}]",
     {"401.9": ["patient's blood pressure", "amlodipine"]}),
    ("Sure! Here you go:\n```json\n{\"401.9 : Unspecified essential hypertension\": [\"hypertension\"],\n"
     " \"967.1\": [\"chloral hydrate\", \" \", \"chloral hydrate\"]}\n```\nHope this helps.",
     {"401.9": ["hypertension"], "967.1": ["chloral hydrate"]}),
    ('[{"code": "9671", "concepts": ["sedative overdose"]}, {"code": "96.71", "concepts": ["intubation"]}]',
     {"96.71": ["intubation"]}),  # 9671 is ambiguous among these codes: not guessed
    ('{"concepts": {"96.71": ["short ventilation"]}}', {"96.71": ["short ventilation"]}),
    ("Parent concepts: [{'401.9': ['essential hypertension']}] and then [{'967.1': ['poisoning']}] done.",
     {"401.9": ["essential hypertension"], "967.1": ["poisoning"]}),
    ("I cannot help with that.", {}),
    ('[{"401.9": "not a list"}, {"999.9": ["unknown code"]}]', {}),
])
def test_parse_reply(reply, expected):
    assert parse_reply(reply, CODES) == expected


def test_parse_reply_matches_dotless_keys_when_unique():
    assert parse_reply('{"4019": ["a"], "V5861": ["b"]}', ["401.9", "V58.61"]) == {"401.9": ["a"], "V58.61": ["b"]}


# -- the HTTP backend against a real local server -------------------------------------------------------------
def test_generation_over_http(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("CEC_API_KEY", KEY)
    server = serve(lambda req: (200, good_answer(req), {}))
    backend = ChatCompletionsBackend(server.url, "test-model", backoff=0.01)
    raw = generate_candidates(entries(), backend, tmp_path / "set.raw.json", code_system="icd9cm", code_set="t")
    assert [level_of(r) for r in server.requests] == ["parent", "leaf"]
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "test-model" and first["body"]["temperature"] == 0.0
    assert [it["leaf_code"][0] for it in prompt_items(first)] == CODES
    assert raw["failures"] == []
    assert raw["batches"] == [{"prompt": "parent", "codes": CODES}, {"prompt": "leaf", "codes": CODES}]
    assert raw["codes"]["96.71"]["leaf_concepts"] == ["leaf continuous mechanical ventilation for less than 96 "
                                                      "consecutive hours", "leaf sign of 96.71"]
    assert read_candidates(tmp_path / "set.raw.json") == raw
    assert sorted(p.name for p in (tmp_path / "set.raw.replies").iterdir()) == [
        "000-parent-try1.txt", "001-leaf-try1.txt"]


def test_transient_errors_are_retried(serve):
    statuses = iter([500, 429, 200])
    server = serve(lambda req: (next(statuses), "fine", {"Retry-After": "0"}))
    backend = ChatCompletionsBackend(server.url + "/chat/completions", "m", api_key=KEY, backoff=0.01)
    assert backend.complete("hi") == "fine"
    assert len(server.requests) == 3


def test_client_errors_fail_at_once_without_the_key(serve):
    server = serve(lambda req: (401, {"error": {"message": f"bad key {req['auth']}"}}, {}))
    backend = ChatCompletionsBackend(server.url, "m", api_key=KEY, backoff=0.01)
    with pytest.raises(GeneratorError, match="HTTP 401") as e:
        backend.complete("hi")
    assert KEY not in str(e.value) and len(server.requests) == 1


def test_timeouts_and_dead_endpoints(serve):
    server = serve(lambda req: (time.sleep(1.0), (200, "late", {}))[1])
    backend = ChatCompletionsBackend(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(GeneratorError, match="no answer after 2 attempts"):
        backend.complete("hi")
    dead = ChatCompletionsBackend("http://127.0.0.1:9/v1", "m", timeout=1, retries=0)
    with pytest.raises(GeneratorError, match="no answer"):
        dead.complete("hi")
    server = serve(lambda req: (200, {"unexpected": True}, {}))
    with pytest.raises(GeneratorError, match="not a chat-completions answer"):
        ChatCompletionsBackend(server.url, "m", backoff=0.01).complete("hi")


def test_unparsable_replies_are_retried_saved_and_reported(serve, tmp_path):
    # the server echoes the Authorization header and never gives 967.1 at the leaf level
    def respond(req):
        skip = ("967.1",) if level_of(req) == "leaf" else ()
        return 200, good_answer(req, skip) + f"\n(auth was {req['auth']})", {}

    server = serve(respond)
    backend = ChatCompletionsBackend(server.url, "m", api_key=KEY, backoff=0.01)
    out = tmp_path / "r.json"
    raw = generate_candidates(entries(), backend, out, code_system="icd9cm", code_set="t", max_attempts=2)
    # parent 1 call; leaf: 1 call for all three, then 1 retry asking for 967.1 alone
    assert [level_of(r) for r in server.requests] == ["parent", "leaf", "leaf"]
    assert [it["leaf_code"][0] for it in prompt_items(server.requests[2])] == ["967.1"]
    assert raw["failures"] == [{"code": "967.1", "prompt": "leaf",
                                "reply": str(tmp_path / "r.replies" / "001-leaf-try2.txt")}]
    assert raw["codes"]["967.1"]["parent_concepts"] and not raw["codes"]["967.1"]["leaf_concepts"]
    saved = [p.read_text() for p in (tmp_path / "r.replies").iterdir()]
    assert len(saved) == 3 and all(KEY not in s and "[API key]" in s for s in saved)
    with pytest.raises(DataError, match=r"967\.1 \(leaf\)"):
        build_concept_set(read_candidates(out))
    # a rerun resumes: only the failed code is asked again
    server2 = serve(lambda req: (200, good_answer(req), {}))
    raw = generate_candidates(entries(), ChatCompletionsBackend(server2.url, "m", backoff=0.01), out,
                              code_system="icd9cm", code_set="t")
    assert len(server2.requests) == 1 and [it["leaf_code"][0] for it in prompt_items(server2.requests[0])] == [
        "967.1"]
    assert raw["failures"] == [] and raw["codes"]["967.1"]["leaf_concepts"]
    assert build_concept_set(raw).counts["total"] > 0


def test_resume_refuses_a_file_for_other_codes(tmp_path, serve):
    server = serve(lambda req: (200, good_answer(req), {}))
    out = tmp_path / "r.json"
    backend = ChatCompletionsBackend(server.url, "m", backoff=0.01)
    generate_candidates(entries(2), backend, out, code_system="icd9cm", code_set="t")
    with pytest.raises(DataError, match="other codes"):
        generate_candidates(entries(3), backend, out, code_system="icd9cm", code_set="t")


# -- the local backend with our engine -------------------------------------------------------------------------
def tiny_model_folder(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from cec.engine.config import ModelConfig
    from cec.engine.model import Transformer

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {**byte_vocab, "<s>": 256, "</s>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    hf = {"model_type": "llama", "vocab_size": 258, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257}
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def test_local_backend_with_our_engine(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    backend = LocalModelBackend(folder, max_new_tokens=12)
    assert backend.name == f"local:{folder}"
    reply = backend.complete("#### Instruction :\nsay hi\n#### Response :\n")
    assert isinstance(reply, str) and reply  # random bytes: at most 12 new tokens, no stop token
    # greedy: the same prompt gives the same reply
    assert backend.complete("#### Instruction :\nsay hi\n#### Response :\n") == reply
    # a random model answers nothing parsable: every code is reported, none dropped
    raw = generate_candidates(entries(2), backend, tmp_path / "r.json", code_system="icd9cm", code_set="t",
                              max_attempts=1)
    assert sorted((f["code"], f["prompt"]) for f in raw["failures"]) == [
        ("401.9", "leaf"), ("401.9", "parent"), ("96.71", "leaf"), ("96.71", "parent")]
    assert all(Path(f["reply"]).is_file() for f in raw["failures"])


# -- dedup and build -------------------------------------------------------------------------------------------
def test_dedup_keeps_the_first_and_maps_duplicates():
    phrases = ["low blood pressure", "fatigue and pallor", "minimal blood pressure", "pallor and fatigue",
               "low blood pressure", "chest x-ray"]
    assert dedup(phrases) == [0, 1, 2, 1, 0, 5]  # cos(low, minimal) = 0.76 < 0.83
    assert dedup(phrases, gamma=0.7)[2] == 0
    assert dedup([]) == []


def test_build_concept_set_maps_duplicates_in_every_code():
    raw = {"code_system": "icd9cm", "code_set": "toy", "batches": [
        {"prompt": "parent", "codes": ["285.9", "285.1"]}, {"prompt": "leaf", "codes": ["285.9", "285.1"]}],
        "codes": {
            "285.9": {"description": "Anemia, unspecified", "parent": {"code": "285", "description": "Other anemias"},
                      "parent_concepts": ["low hemoglobin", "anemia", "pallor and fatigue"],
                      "leaf_concepts": ["anemia of unclear cause", "low hemoglobin"]},
            "285.1": {"description": "Acute posthemorrhagic anemia",
                      "parent": {"code": "285", "description": "Other anemias"},
                      "parent_concepts": ["anemia", "fatigue and pallor", "low  hemoglobin"],
                      "leaf_concepts": ["acute blood loss", "hemorrhage"]}}}
    cs = build_concept_set(raw)
    texts = [c.text for c in cs.concepts]
    assert texts[:3] == ["low hemoglobin", "anemia", "pallor and fatigue"]
    # siblings share their parent's concepts after dedup (whitespace runs collapse before comparing)
    assert cs.parent_ids["285.1"] == [1, 2, 0]
    # a leaf phrase that repeats a parent phrase maps to the parent-level concept
    assert cs.concepts[cs.leaf_ids["285.9"][-1]] == cs.concepts[0] and cs.concepts[0].level == "parent"
    assert cs.counts == {"parent": 3, "leaf": len(texts) - 3, "total": len(texts)}
    assert [c.id for c in cs.concepts_of("285.9")] == list(dict.fromkeys([0, 1, 2] + cs.leaf_ids["285.9"]))
    assert set(cs.codes_of(0)) == {"285.9", "285.1"}
    assert cs.build["candidates"] == {"parent": 6, "leaf": 4, "total": 10}
    back = ConceptSet.from_dict(json.loads(cs.dumps()))
    assert back.to_dict() == cs.to_dict()
    with pytest.raises(DataError, match="not in concept set"):
        cs.concepts_of("999.9")


# -- shipped sets ----------------------------------------------------------------------------------------------
PAPER_STYLE_COUNTS = {  # recorded in cec/resources/concepts/README.md
    "mimic3-50": {"parent": 327, "leaf": 221, "total": 548},
    "mimic3-rare50": {"parent": 348, "leaf": 204, "total": 552},
    "codiesp-d50": {"parent": 341, "leaf": 176, "total": 517},
}


def test_shipped_sets_load():
    assert shipped_concept_sets() == sorted(PAPER_STYLE_COUNTS)
    for name, counts in PAPER_STYLE_COUNTS.items():
        cs = load_concept_set(name)
        assert cs.name == name and len(cs.codes) == 50 and cs.counts == counts
        assert cs.code_system == ("icd10cm" if name.startswith("codiesp") else "icd9cm")
        assert all(cs.parent_ids[c] and cs.leaf_ids[c] for c in cs.codes)
        assert load_concept_set(SHIPPED / f"{name}.json").to_dict() == cs.to_dict()
    cs = load_concept_set("mimic3-50")
    assert cs.codes[:3] == ["401.9", "38.93", "428.0"]
    assert cs.parents["96.71"] == ("96.7", "Other continuous mechanical ventilation")
    # siblings under 96.7 both generated "mechanical ventilation" first: one concept, shared
    first = cs.concepts[cs.parent_ids["96.71"][0]]
    assert first.text == "mechanical ventilation" and cs.parent_ids["96.72"][0] == first.id
    assert set(cs.codes_of(first.id)) == {"96.71", "96.72"}


def build_main():
    return runpy.run_path(str(ROOT / "scripts" / "build_concepts.py"))["main"]


@pytest.mark.parametrize("name", sorted(PAPER_STYLE_COUNTS))
def test_shipped_sets_rebuild_from_their_raw_candidates(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the build records the raw path as given, relative to the repo
    out = tmp_path / f"{name}.json"
    summary = build_main()(["--raw", f"cec/resources/concepts/raw/{name}.json", "--out", str(out)])
    assert summary["counts"] == PAPER_STYLE_COUNTS[name]
    assert json.loads(capsys.readouterr().out)["counts"] == PAPER_STYLE_COUNTS[name]
    assert out.read_text() == (SHIPPED / f"{name}.json").read_text()


def test_build_cli_generates_over_http(serve, tmp_path, shared_dir, capsys):
    server = serve(lambda req: (200, good_answer(req), {}))
    codes = tmp_path / "codes.txt"
    codes.write_text("401.9\n96.71\nV5861\n")  # dotless V codes are diagnoses: V58.61
    summary = build_main()([
        "--codes", str(codes), "--code-system", "icd9cm",
        "--icd9-descriptions", str(shared_dir / "data/icd9/ICD9_descriptions"),
        "--backend", "http", "--url", server.url, "--model", "m",
        "--raw", str(tmp_path / "s.raw.json"), "--out", str(tmp_path / "s.json"), "--name", "mine"])
    assert summary["codes"] == 3 and summary["counts"]["total"] > 0
    cs = load_concept_set(tmp_path / "s.json")
    assert cs.name == "mine" and cs.codes == ["401.9", "96.71", "V58.61"]
    assert cs.parents["V58.61"] == ("V58.6", "Encounter for long-term (current) drug use")
    assert [c.text for c in cs.concepts_of("96.71", "leaf")][0].startswith("leaf continuous mechanical")


def test_build_cli_user_errors(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_concepts.py"), "--raw",
                          str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "missing.json: no such file" in run.stderr


def test_load_concept_set_errors(tmp_path):
    with pytest.raises(DataError, match="not a shipped set") as e:
        load_concept_set("mimic4-50")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="raw candidates file"):
        load_concept_set(SHIPPED / "raw" / "mimic3-50.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_concept_set(bad)
    d = load_concept_set("codiesp-d50").to_dict()
    d["codes"]["R52"]["leaf_concepts"] = [10_000]
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="R52.*concept ids"):
        load_concept_set(bad)
    d = load_concept_set("codiesp-d50").to_dict()
    d["concepts"][3]["level"] = "grandparent"
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="concept 3 has level"):
        load_concept_set(bad)


def test_code_entries_from_icd(shared_dir):
    icd = icd9cm(descriptions=shared_dir / "data/icd9/ICD9_descriptions")
    got = code_entries(["96.71", "486"], icd)
    assert got["96.71"]["parent"] == {"code": "96.7", "description": "Other continuous mechanical ventilation"}
    assert got["486"]["parent"]["code"] == "480-488.99"
    with pytest.raises(DataError, match="no description for '96.7'"):
        code_entries(["96.71"], icd9cm())  # CMS titles have no headings
    assert code_entries(["96.71"], icd9cm(), {"96.7": "Other continuous mechanical ventilation"})
