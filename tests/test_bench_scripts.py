"""The measuring scripts of issue 18: the FLOP counter (scripts/profile_prefix.py's ForwardLog, which
scripts/bench_note.py uses) against a hand count, bench_note's floor and time breakdown on a tiny pipeline,
profile_prefix's shared scoring against naive (on CPU, and in bf16 on a GPU when one is present), and
scripts/device_check.sh's CPU dry run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cec.engine import attention
from cec.engine.config import ModelConfig
from cec.engine.model import Transformer
from cec.engine.scorer import PrefixScorer, head_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_note  # noqa: E402
import profile_prefix  # noqa: E402
from profile_prefix import ForwardLog  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> Transformer:
    """Two layers, the first with a sliding window of 4: h 16, q 2x8, kv 1x8, ffn 24."""
    cfg = ModelConfig.from_hf({"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 16,
                               "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 8,
                               "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_flop_count_matches_a_hand_count():
    model = tiny_model()
    head = head_for(model, [3, 4], [5])  # 3 answer rows
    with ForwardLog({model: head.rows.shape[0]}) as log:
        PrefixScorer(model, head).score([10, 11, 12, 13, 14], [[20, 21, 22], [30, 31, 32]])
    assert [(c.kind, c.batch, c.tokens, c.start) for c in log.calls] == [("prefill", 1, 5, 0), ("questions", 2, 3, 5)]
    per_token = 2 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 24)  # q, k+v, o, gate+up+down: 3840
    linear = (5 * per_token * 2  # prefill: 5 tokens through both layers
              + 6 * per_token  # questions, layer 0: 2 x 3 tokens
              + 6 * 2 * (2 * 16 * 8) + 2 * 2 * (16 * 16 + 16 * 16 + 3 * 16 * 24))  # final layer: k/v of all 6, rest of 2
    # visible keys per query (causal, window 4 in layer 0); "own" = keys of the call's own tokens
    own = (1 + 2 + 3 + 4 + 4) + (1 + 2 + 3 + 4 + 5) + 2 * (1 + 2 + 3) + 2 * 3
    cached = 0 + 0 + 2 * (4 + 4 + 4 - 6) + 2 * (8 - 3)
    per_pair = 4 * 2 * 8
    assert log.flops() == {"linear": linear, "attention_cached": per_pair * cached, "attention_own": per_pair * own,
                           "head": 2 * 2 * 16 * 3,
                           "total": linear + per_pair * (cached + own) + 2 * 2 * 16 * 3}
    shapes = log.matmuls()
    assert shapes[("k_proj", 6, 16, 8)] == 2 and shapes[("q_proj", 2, 16, 16)] == 1 and shapes[("head", 2, 16, 3)] == 1
    assert sum(2 * m * k * n * c for (name, m, k, n), c in shapes.items() if name != "head") == linear


def test_useful_flops_leave_out_the_padding():
    model = tiny_model()
    head = head_for(model, [3], [5])
    # 20 questions of 21 tokens and one of 20: one batch (padding 1 of 441 tokens, under the scorer's 5%)
    questions = [[20 + i, *range(1, 21)] for i in range(20)] + [[50, *range(1, 20)]]
    with ForwardLog({model: 2}) as log:
        PrefixScorer(model, head).score([10, 11, 12], questions)
    (call,) = [c for c in log.calls if c.kind == "questions"]
    assert (call.batch, call.tokens) == (21, 21)
    assert log.matmuls()[("k_proj", 441, 16, 8)] == 2 and log.matmuls(useful=True)[("k_proj", 440, 16, 8)] == 2
    assert log.flops(useful=True)["total"] < log.flops()["total"]


def test_visible_keys_is_the_sum_it_names():
    for start, n, window in [(0, 5, None), (3, 4, None), (0, 9, 4), (2, 7, 4), (10, 3, 4), (0, 1, 1)]:
        want = sum(min(p + 1, window or p + 1) for p in range(start, start + n))
        assert profile_prefix.visible_keys(start, n, window) == want


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    # imported here: they import cec.engine.weights, whose gguf a GPU machine may lack, and the CUDA test
    # of this file must still be collected there
    from cec.coding.pipeline import PipelineConfig
    from cec.data import write_notes
    from tiny_train import save_tiny_model, tiny_concept_set, tiny_notes

    root = tmp_path_factory.mktemp("bench")
    save_tiny_model(root / "model", "gemma3")
    tiny_concept_set().save(root / "concepts.json")
    PipelineConfig(base_model=str(root / "model"), concept_set=str(root / "concepts.json"), k=4,
                   max_note_tokens=10_000).save(root / "pipe")
    write_notes(root / "notes.jsonl", tiny_notes(2))
    return root


def test_bench_note_reports_the_floor_and_where_the_time_goes(tiny_pipeline, tmp_path):
    attend_before = attention.attend_with_lse
    out = bench_note.main(["--pipeline", str(tiny_pipeline / "pipe"), "--notes", str(tiny_pipeline / "notes.jsonl"),
                           "--n", "1", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == out
    note = out["stages"]["llm"]["notes"][0]
    assert note["code_questions"] == 5 and note["flops"] == note["flops_by_part"]["total"] > 0
    assert note["floor_seconds"] > 0
    # seconds and floor_seconds are rounded to ms (on this tiny model the floor is a few ms, so the rounding alone
    # moves their ratio by up to ~10%); over_floor, from the unrounded values, must lie inside the rounding's bounds
    s, f, half_ms = note["seconds"], note["floor_seconds"], 0.0005
    assert (s - half_ms) / (f + half_ms) <= note["over_floor"] <= (s + half_ms) / (f - half_ms)
    parts = note["breakdown"]["parts"]
    assert any(k.startswith("questions: linear") for k in parts) and "questions: prefix partial" in parts
    # the exclusive parts add up to the note's wall time
    assert sum(parts.values()) == pytest.approx(note["seconds"], rel=0.1, abs=0.02)
    kinds = [c["kind"] for c in note["forward_calls"]]
    assert kinds.count("prefill") == 2 and kinds.count("questions") >= 2  # one prefill per stage
    plans = out["stages"]["llm"]["question_batchings_first_note"]
    assert plans["as run"]["calls"] >= plans["any padding"]["calls"] and plans["any padding"]["floor_seconds"] > 0
    # the timers are gone: the engine's functions are its own again
    assert attention.attend_with_lse is attend_before


def run_profile(tmp_path, device: str, dtype: str) -> dict:
    out = tmp_path / f"profile_{device}.json"
    profile_prefix.main(["--config", "tiny-llama", "--device", device, "--dtype", dtype, "--prefix-tokens", "40",
                         "--questions", "10", "--question-tokens", "8", "--common-tokens", "3", "--naive-questions",
                         "5", "--modes", "naive,shared", "--head-rows", "8", "--json", str(out)])
    return json.loads(out.read_text())


def test_profile_prefix_shared_matches_naive_and_reports_its_floor(tmp_path):
    res = run_profile(tmp_path, "cpu", "fp32")
    assert res["max_abs_dp"] < 1e-5
    assert res["modes"]["naive"]["questions_timed"] == 5
    assert res["flops"] > 0 and res["measured_peak_tflops"] > 0 and res["floor_seconds"] > 0
    assert res["flop_floor_ratio"] == pytest.approx(res["achieved_tflops"] / res["measured_peak_tflops"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_prefix_shared_matches_naive_bf16_cuda(tmp_path):
    res = run_profile(tmp_path, "cuda", "bf16")
    assert res["max_abs_dp"] < 0.02  # P(yes); bf16 sums in another order
    assert 0 < res["flop_floor_ratio"] < 1.5


@pytest.mark.slow
def test_device_check_dry_run_on_cpu_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    names = ["env", "gpu", "tests", "profile_tiny-llama", "profile_tiny-gemma"]
    assert doc["steps_ran"] == names and doc["steps_ok"] == names
    assert doc["steps"]["gpu"]["result"]["cuda_available"] is False
    tests = doc["steps"]["tests"]["result"]
    assert "tests/test_yesno_head.py" in tests["files"] and tests["skipped"] > 0 and tests["passed"] == 0
    for config in ("tiny-llama", "tiny-gemma"):
        profile = doc["steps"][f"profile_{config}"]["result"]
        assert profile["achieved_tflops"] > 0 and profile["measured_peak_tflops"] > 0
        assert doc["targets"][config]["max_abs_dp"] < 1e-5 and set(doc["targets"][config]["met"]) == {
            "shared_fraction_of_bf16_peak", "speedup_vs_hf_naive", "speedup_vs_hf_reuse", "max_abs_dp"}
    assert Path(doc["log"]).is_file()


def test_device_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--bogus"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown argument --bogus" in proc.stderr
