"""Gale-Church alignment and CodiEsp-X offsets (cec.evaluation.align)."""
from cec.evaluation.align import align, map_span, parse_offsets


def test_equal_lengths_align_one_to_one():
    assert align([40, 80, 25], [42, 77, 26]) == [([0], [0]), ([1], [1]), ([2], [2])]


def test_a_source_sentence_split_in_two_is_a_one_to_two_group():
    # the translation splits the second sentence (100 chars) into 55 + 50
    got = align([60, 100, 30, 70], [58, 55, 50, 31, 69])
    assert got == [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4])]
    assert align([58, 55, 50, 31, 69], [60, 100, 30, 70]) == [([0], [0]), ([1, 2], [1]), ([3], [2]), ([4], [3])]


def test_length_ratio_is_taken_from_the_documents():
    # a target language 20% shorter throughout still aligns one to one
    src = [100, 50, 120, 40, 90]
    assert align(src, [round(0.8 * x) for x in src]) == [([i], [i]) for i in range(5)]


def test_no_alignment_when_one_side_is_over_twice_the_other():
    assert align([10, 10, 10, 10, 10], [50, 50]) is None
    assert align([], []) == []


def test_offsets_and_mapping_onto_target_sentences():
    assert parse_offsets("307 316;348 361") == [(307, 316), (348, 361)]
    assert parse_offsets("5 9") == [(5, 9)]
    src_sents = [(0, 60), (61, 161), (162, 192)]
    groups = [([0], [0]), ([1], [1, 2]), ([2], [3])]
    assert map_span([(70, 80)], src_sents, groups) == [1, 2]  # inside a split sentence: both halves
    assert map_span([(10, 20), (170, 175)], src_sents, groups) == [0, 3]  # discontinuous
    assert map_span([(60, 61)], src_sents, groups) == []  # the space between sentences


def test_codiesp_dev_gold_maps_onto_english_lines(shared_dir):
    """Every dev note aligns; a sample mention lands on the English line that translates it."""
    from cec.coding.attribution import note_sentences
    from cec.coding.report import sentence_spans

    dev = shared_dir / "data" / "codiesp" / "dev"
    es = (dev / "text_files" / "S0004-06142005000900016-1.txt").read_text()
    en = (dev / "text_files_en" / "S0004-06142005000900016-1.txt").read_text().strip()
    ss, ens = sentence_spans(es, ".!?"), note_sentences(en)
    groups = align([b - a for a, b in ss], [b - a for a, b in ens])
    assert groups is not None
    (j,) = map_span(parse_offsets("198 229"), ss, groups)  # 'infecciones del tracto urinario'
    assert "urinary tract infections" in en[ens[j][0]:ens[j][1]]


def load_eval():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "evidence_eval.py"
    spec = importlib.util.spec_from_file_location("evidence_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_ranking_hit_rate_is_exact():
    ev = load_eval()
    assert abs(ev.random_hit(10, 1, 1) - 0.1) < 1e-12 and abs(ev.random_hit(10, 1, 3) - 0.3) < 1e-12
    assert abs(ev.random_hit(10, 2, 3) - (1 - 56 / 120)) < 1e-12 and ev.random_hit(3, 1, 3) == 1.0


def test_bm25_ranks_by_the_code_words_ties_in_note_order():
    ev = load_eval()
    text = "No fever.\nBlood pressure 180/100 on arrival.\nHe smokes.\nHypertension treated with enalapril."
    from cec.coding.attribution import note_sentences

    spans = note_sentences(text)
    assert set(ev.bm25_order(text, spans, "Essential (primary) hypertension high blood pressure")[:2]) == {1, 3}
    assert ev.bm25_order(text, spans, "of the") == [0, 1, 2, 3]  # no content word: note order


def test_evidence_eval_runs_end_to_end_on_a_tiny_linear_pipeline(tmp_path, monkeypatch, capsys):
    """scripts/evidence_eval.py on a tiny pipeline (linear stage 2) and a two-note stand-in for CodiEsp dev:
    gold mapped through the aligner, rankings (with the ours_N rows), faithfulness and time in the JSON."""
    import json

    import torch
    from tiny_train import save_tiny_model, tiny_concept_set

    from cec.coding.bottleneck import Bottleneck
    from cec.coding.calibration import Platt

    ev = load_eval()
    torch.manual_seed(0)
    cs = tiny_concept_set()
    save_tiny_model(tmp_path / "model", vocab_size=600)
    cs.save(tmp_path / "concepts.json")
    rng = torch.Generator().manual_seed(1)
    p = torch.rand(40, len(cs.concepts), generator=rng).numpy()
    y = torch.rand(40, len(cs.codes), generator=rng).numpy() < 0.4
    Bottleneck.fit(cs, p, y, l2=1.0).save(tmp_path / "bottleneck.json")
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({
        "base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json"), "threshold": 0.0,
        "label_stage": "linear", "bottleneck": "bottleneck.json", "calibration": Platt(0.8, 0.1).to_json()}))
    src = tmp_path / "src"
    (src / "dev" / "text_files").mkdir(parents=True)
    (src / "codiesp50_codes.tsv").write_text("code\n" + "\n".join(cs.codes) + "\n")
    es = ["Paciente con fiebre y escalofrios.", "Tension arterial alta con lisinopril.", "Sin otros hallazgos."]
    en = ["Patient with fever and chills.", "High blood pressure on lisinopril.", "No other findings."]
    notes, gold = [], []
    for k in range(2):
        nid = f"note{k}"
        (src / "dev" / "text_files" / f"{nid}.txt").write_text(" ".join(es), encoding="utf-8")
        notes.append({"id": nid, "text": "\n".join(en), "labels": ["E5", "C3"]})
        start = len(es[0]) + 1
        gold += [f"{nid}\tDIAGNOSTICO\te5\tfiebre\t14 20", f"{nid}\tDIAGNOSTICO\tc3\ttension\t{start} {start + 7}"]
    (src / "dev" / "devX.tsv").write_text("\n".join(gold) + "\n", encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(n) + "\n" for n in notes))
    out = ev.main(["--src", str(src), "--dev", str(dev), "--pipeline", str(tmp_path), "--max-notes", "2",
                   "--per-code", "2", "--out", str(tmp_path / "ev.json")])
    assert json.loads((tmp_path / "ev.json").read_text()) == out
    assert out["alignment"]["gold_pairs_with_sentence"] == 4 and out["alignment"]["d50_mentions_mapped"] == 4
    r = out["ranking"]
    rows = ("ours", "ours_1", "bm25", "first")
    assert r["gold_pairs"] == 4 and set(rows) | {"random"} <= set(r)
    assert all(0 <= r[m]["hit@1"] <= r[m]["hit@3"] <= 1 for m in rows)
    split = [r[k] for k in ("predicted", "not_predicted") if k in r]
    assert sum(x["pairs"] for x in split) == 4 and all(set(rows) <= set(x) for x in split)
    assert out["faithfulness"]["codes"] == 2 and out["time"]["per_code"] == 2 and out["time"]["notes"] == 2
    assert out["time"]["ratio_with_evidence"] > 1
    second = ev.main(["--src", str(src), "--dev", str(dev), "--pipeline", str(tmp_path), "--skip", "1",
                      "--max-notes", "5", "--per-code", "2", "--no-faithfulness", "--gain"])
    assert second["ranking"]["notes"] == 1 and second["ranking"]["gold_pairs"] == 2  # note1 only
    assert {"ours_drop", "ours_gain"} <= set(second["ranking"]) and "ours_drop" not in out["ranking"]
    assert second["time"]["gain"] and not out["time"]["gain"]
