"""The linear concept-bottleneck stage 2, Platt calibration, the two-fold dev protocol, and a pipeline whose
label_stage is "linear" (tiny random Gemma 3 and tiny concept set)."""
import json

import numpy as np
import pytest
import torch

from cec.coding.bottleneck import L2_GRID, Bottleneck, concept_logits
from cec.coding.calibration import Platt, expected_calibration_error
from cec.evaluation.crossfit import bottleneck_system, fit_bottleneck, halves, score_system, two_fold
from cec.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cs():
    from tiny_train import tiny_concept_set

    return tiny_concept_set()


def synthetic(cs, n=80, seed=0):
    """Notes whose codes are present exactly when their first leaf concept is probable (plus noise elsewhere)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.4, size=(n, len(cs.concepts)))
    y = rng.random((n, len(cs.codes))) < 0.3
    for j, code in enumerate(cs.codes):
        first = (cs.leaf_ids[code] or cs.concept_ids(code))[0]
        p[y[:, j], first] = rng.uniform(0.8, 0.99, size=y[:, j].sum())
    return p, y


def test_bottleneck_learns_the_signal_and_its_terms_sum_to_the_logit(cs):
    p, y = synthetic(cs)
    model = Bottleneck.fit(cs, p[:60], y[:60], l2=1.0)
    from cec.evaluation.metrics import micro_auc

    assert micro_auc(y[60:], model.probs(p[60:]).numpy()) > 0.9
    z = model.logits(p[0])
    for j in range(len(cs.codes)):
        terms = model.contributions(p[0], j)
        assert set(terms) == set(cs.concept_ids(cs.codes[j]))
        assert sum(terms.values()) + model.bias[j] == pytest.approx(float(z[j]), abs=1e-9)


def test_bottleneck_file_round_trips_and_refuses_another_code_set(cs, tmp_path):
    p, y = synthetic(cs)
    model = Bottleneck.fit(cs, p, y, l2=1.0)
    model.save(tmp_path / "b.json")
    again = Bottleneck.load(tmp_path / "b.json", cs)
    assert torch.equal(model.probs(p), again.probs(p))
    d = json.loads((tmp_path / "b.json").read_text())
    d["codes"] = dict(list(d["codes"].items())[1:])
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="another code set"):
        Bottleneck.load(tmp_path / "other.json", cs)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a concept-bottleneck file"):
        Bottleneck.load(tmp_path / "bad.json", cs)


def test_bottleneck_reads_the_direct_question_when_fitted_with_it(cs, tmp_path):
    p, y = synthetic(cs)
    rng = np.random.default_rng(1)
    p[:] = rng.uniform(0.01, 0.4, size=p.shape)  # the concepts carry no signal; the direct question does
    direct = np.where(y, rng.uniform(0.7, 0.95, size=y.shape), rng.uniform(0.05, 0.5, size=y.shape))
    plain = Bottleneck.fit(cs, p[:60], y[:60], l2=1.0)
    model = Bottleneck.fit(cs, p[:60], y[:60], l2=1.0, direct_p=direct[:60])
    from cec.evaluation.metrics import micro_auc

    assert plain.direct is None and model.direct > 0
    assert micro_auc(y[60:], model.probs(p[60:], direct[60:]).numpy()) > 0.9
    assert micro_auc(y[60:], plain.probs(p[60:]).numpy()) < 0.75
    assert_terms_add_up(model, p[0], model.logits(p[0], direct[0]), lambda j: model.direct_term(direct[0], j))
    with pytest.raises(ValueError, match="direct question"):
        model.probs(p[0])
    model.save(tmp_path / "b.json")
    again = Bottleneck.load(tmp_path / "b.json", cs)
    assert again.direct == model.direct and torch.equal(again.probs(p, direct), model.probs(p, direct))
    plain.save(tmp_path / "plain.json")
    assert "direct" not in json.loads((tmp_path / "plain.json").read_text())


def assert_terms_add_up(model, p_note, z, side_term):
    """Each code's logit z[j] is its concepts' contributions + its bias + the side input's term (side_term(j))."""
    for j in range(len(z)):
        total = sum(model.contributions(p_note, j).values()) + model.bias[j] + side_term(j)
        assert total == pytest.approx(float(z[j]), abs=1e-9)


def worded(cs, y, seed=0):
    """Texts in which code j's word "wordj" appears when the note has code j, among noise words."""
    rng = np.random.default_rng(seed)
    return [" ".join(list(rng.choice([f"noise{i}" for i in range(20)], 8)) + [f"word{j}" for j in np.flatnonzero(row)])
            for row in y]


def test_bottleneck_reads_the_lexical_prior_and_ships_it_beside_its_file(cs, tmp_path):
    from cec.coding.lexical import LexicalPrior
    from cec.evaluation.metrics import micro_auc

    p, y = synthetic(cs)
    p[:] = np.random.default_rng(1).uniform(0.01, 0.4, size=p.shape)  # the concepts carry no signal; the words do
    texts = worded(cs, y)
    prior = LexicalPrior.fit(texts[:60], y[:60], cs.codes, C=10.0)
    lexical = LexicalPrior.out_of_fold(texts[:60], y[:60], cs.codes, C=10.0)
    model = Bottleneck.fit(cs, p[:60], y[:60], l2=1.0, lexical_z=lexical, prior=prior)
    assert model.lexical > 0 and model.direct is None and model.side == {"lexical": model.lexical}
    z_test = prior.logits(texts[60:])
    assert micro_auc(y[60:], model.probs(p[60:], lexical_z=z_test).numpy()) > 0.9
    assert_terms_add_up(model, p[60], model.logits(p[60], lexical_z=z_test[0]),
                        lambda j: model.lexical_term(z_test[0], j))
    with pytest.raises(ValueError, match="lexical prior"):
        model.probs(p[60])
    model.save(tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["lexical"]["file"] == "b.lexical.safetensors"
    again = Bottleneck.load(tmp_path / "b.json", cs)
    assert again.lexical == model.lexical and again.prior.vocabulary == prior.vocabulary
    assert torch.allclose(again.probs(p[60:], lexical_z=again.prior.logits(texts[60:])),
                          model.probs(p[60:], lexical_z=z_test), atol=1e-6)
    (tmp_path / "b.lexical.safetensors").unlink()
    with pytest.raises(DataError, match="no such lexical-prior file"):
        Bottleneck.load(tmp_path / "b.json", cs)
    model.prior = None
    with pytest.raises(ValueError, match="has none to save"):
        model.save(tmp_path / "c.json")


def test_out_of_fold_predictions_never_see_their_note(cs):
    p, y = synthetic(cs, n=30)
    oof = Bottleneck.out_of_fold(cs, p, y, folds=3, l2=1.0)
    # a note's out-of-fold prediction does not change when its own label flips
    y2 = y.copy()
    y2[0] = ~y2[0]
    assert np.allclose(Bottleneck.out_of_fold(cs, p, y2, folds=3, l2=1.0)[0], oof[0])


def test_l2_is_chosen_by_cross_validation(cs):
    p, y = synthetic(cs, n=24)
    assert Bottleneck.fit(cs, p, y, folds=2).l2 in L2_GRID


def test_concept_logits_are_clipped():
    x = concept_logits(np.array([0.0, 1.0, 0.5]))
    assert x.tolist() == [-8.0, 8.0, 0.0]


def test_platt_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-z))
    overconfident = 1 / (1 + np.exp(-(3 * z + 1)))  # logit = 3z + 1
    cal = Platt.fit(overconfident, y)
    assert cal.a == pytest.approx(1 / 3, abs=0.03) and cal.b == pytest.approx(-1 / 3, abs=0.05)
    assert expected_calibration_error(cal(overconfident), y) < 0.02 < expected_calibration_error(overconfident, y)
    assert Platt.from_json(cal.to_json()) == cal
    with pytest.raises(DataError):
        Platt.from_json({"method": "isotonic"})
    with pytest.raises(DataError):
        Platt.fit(overconfident, np.zeros_like(y))


def test_ece_of_a_perfectly_calibrated_constant():
    assert expected_calibration_error(np.full(10, 0.3), np.array([1, 1, 1] + [0] * 7)) == pytest.approx(0.0)
    assert expected_calibration_error(np.ones(4), np.zeros(4)) == pytest.approx(1.0)


def test_two_fold_predicts_each_note_from_the_other_half(cs):
    p, y = synthetic(cs, n=40)
    seen = []

    def system(tune):
        seen.append(set(tune.tolist()))
        return score_system(p[:, :len(cs.codes)], y, calibrate=False)(tune)

    r = two_fold(system, y)
    a, b = halves(len(y))
    assert seen == [set(a.tolist()), set(b.tolist())] and not set(a) & set(b)
    assert len(r["micro_f1_directions"]) == 2 and r["micro_f1_ci95"][0] <= r["micro_f1"] <= r["micro_f1_ci95"][1]
    good = two_fold(bottleneck_system(cs, p, y, folds=3, l2=1.0), y)
    assert good["micro_auc"] > 0.9 and 0 <= good["ece"] <= 1


def test_two_fold_tunes_thresholds_on_the_labels_the_system_was_fitted_on(cs):
    """fit_y (coder labels) is what a threshold is tuned on; every metric stays against y (all gold)."""
    from cec.evaluation.crossfit import cross_fitted
    from cec.evaluation.metrics import tune_threshold

    p, y = synthetic(cs, n=40)
    scores = p[:, :len(cs.codes)]
    fit_y = y.copy()
    fit_y[scores < 0.8] = 0  # a coder who codes only what the scores say loudly
    system = score_system(scores, fit_y, calibrate=False)
    _, _, thresholds, _ = cross_fitted(system, y, fit_y=fit_y)
    assert thresholds == [tune_threshold(fit_y[h], scores[h]) for h in halves(len(y))]
    assert thresholds != cross_fitted(system, y)[2]
    r, same = two_fold(system, y, fit_y=fit_y), two_fold(system, y)
    assert r["micro_auc"] == same["micro_auc"] and r["micro_f1"] != same["micro_f1"]


def test_two_fold_reports_the_figures_without_the_blanked_gold_pairs(cs):
    """blanked: gold pairs a coder would not code from the note as read; micro-AUC without them leaves them out of
    positives and negatives alike, micro-F1 without them counts them as not gold."""
    from cec.evaluation.crossfit import cross_fitted
    from cec.evaluation.metrics import micro_f1, roc_auc

    p, y = synthetic(cs, n=40)
    scores = p[:, :len(cs.codes)]
    system = score_system(scores, y, calibrate=False)
    assert "micro_auc_without_blanked" not in two_fold(system, y)
    assert "micro_auc_without_blanked" not in two_fold(system, y, blanked=np.zeros(y.shape, dtype=bool))
    blanked = y & (scores < np.median(scores[y]))  # the gold pairs the scores miss most
    r = two_fold(system, y, blanked=blanked)
    probs, pred, _, _ = cross_fitted(system, y)
    keep = ~blanked
    assert r["blanked_pairs"] == int(blanked.sum()) > 0
    assert r["micro_auc_without_blanked"] == roc_auc(y[keep], probs[keep]) > r["micro_auc"]
    assert r["micro_f1_without_blanked"] == micro_f1(y & keep, pred)
    assert {k: v for k, v in r.items() if "blanked" not in k} == two_fold(system, y)  # the rest unchanged


def test_fit_bottleneck_also_fits_on_more_notes_and_scores_only_the_tuning_notes_out_of_fold(cs):
    """also = (probabilities, labels) of more notes (the training notes): in the fit, not in the out-of-fold
    probabilities the calibration and threshold are fitted on, and none of those from a model that saw its note."""
    p, y = synthetic(cs, n=90)
    tune = np.arange(30, 60)
    alone, oof_alone = fit_bottleneck(cs, p, y, tune, l2=1.0)
    model, oof = fit_bottleneck(cs, p, y, tune, l2=1.0, also=(p[:30], y[:30]))
    assert oof.shape == oof_alone.shape == (30, len(cs.codes))
    both = np.concatenate([p[:30], p[tune]]), np.concatenate([y[:30], y[tune]])
    assert torch.equal(model.probs(p[60:]), Bottleneck.fit(cs, *both, l2=1.0).probs(p[60:]))
    assert np.allclose(oof, Bottleneck.out_of_fold(cs, *both, l2=1.0)[30:])
    assert not torch.allclose(model.probs(p[60:]), alone.probs(p[60:]))
    y2 = y.copy()
    y2[30] = ~y2[30]  # a tuning note's own label never reaches its out-of-fold probability
    assert np.allclose(fit_bottleneck(cs, p, y2, tune, l2=1.0, also=(p[:30], y[:30]))[1][0], oof[0])
    with pytest.raises(ValueError, match="no direct-question scores"):
        fit_bottleneck(cs, p, y, tune, direct_p=p[:, : len(cs.codes)], also=(p[:30], y[:30]))


def test_pipeline_with_a_linear_stage_2(cs, tmp_path):
    from tiny_train import save_tiny_model

    from cec.coding.output import code_list
    from cec.coding.pipeline import CECPipeline

    save_tiny_model(tmp_path / "model")
    cs.save(tmp_path / "concepts.json")
    p, y = synthetic(cs)
    Bottleneck.fit(cs, p, y, l2=1.0).save(tmp_path / "bottleneck.json")
    cal = Platt(0.5, -0.2)
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({
        "base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json"), "threshold": 0.3,
        "label_stage": "linear", "bottleneck": "bottleneck.json", "calibration": cal.to_json(), "k": 3}))
    torch.set_num_threads(1)
    pipe = CECPipeline.load(tmp_path)
    note = "Fever and chills. High blood pressure.\n"
    result = pipe.code_note(note)
    expected = cal(pipe.bottleneck.probs(result.concept_probs))
    assert result.shown is None and result.code_probs.tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    by_code = {c["code"]: c for c in code_list(result, pipe)}
    for j, code in enumerate(cs.codes):
        c = by_code[code]
        assert c["probability"] == pytest.approx(float(expected[j]), abs=1e-6)
        assert c["predicted"] == (c["probability"] >= 0.3)
        assert 0 < len(c["evidence"]) <= 3 and all(e["role"] == "own" and "contribution" in e for e in c["evidence"])
        contributions = [e["contribution"] for e in c["evidence"]]
        assert contributions == sorted(contributions, reverse=True)
    assert result.timing["questions"] == len(pipe.concept_questions)
    # a linear stage without its weights file is one clear error
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({
        "base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json"),
        "label_stage": "linear"}))
    with pytest.raises(DataError, match="no bottleneck file"):
        CECPipeline.load(tmp_path)
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({"label_stage": "tree"}))
    with pytest.raises(DataError, match="label_stage"):
        CECPipeline.load(tmp_path)


def test_pipeline_whose_linear_stage_also_reads_the_direct_question(cs, tmp_path):
    from tiny_train import random_lora_, save_tiny_model

    from cec.coding.attribution import attribute, concept_effects, direct_question_effects, note_sentences
    from cec.coding.output import code_list
    from cec.coding.pipeline import CECPipeline, share_base
    from cec.engine.lora import inject_lora, save_adapter
    from cec.engine.weights import load_model

    save_tiny_model(tmp_path / "model")
    cs.save(tmp_path / "concepts.json")
    model, _ = load_model(tmp_path / "model")
    twin = share_base(model)
    lora = inject_lora(twin, r=4, alpha=8)
    random_lora_(twin, seed=3, scale=0.3)
    save_adapter(twin, tmp_path / "direct", lora, meta={"concept_set_codes": cs.codes})
    p, y = synthetic(cs)
    direct = np.clip(p[:, :len(cs.codes)] + 0.3 * y, 0.01, 0.99)
    Bottleneck.fit(cs, p, y, l2=1.0, direct_p=direct).save(tmp_path / "bottleneck.json")
    raw = {"base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json"), "threshold": 0.0,
           "label_stage": "linear", "bottleneck": "bottleneck.json", "k": 3}
    (tmp_path / "cec_pipeline.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="no direct_adapter"):
        CECPipeline.load(tmp_path)
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({**raw, "direct_adapter": "direct"}))
    torch.set_num_threads(1)
    pipe = CECPipeline.load(tmp_path)
    note = "Fever and chills.\nHigh blood pressure.\n"
    result = pipe.code_note(note)
    # the direct question is asked of the direct adapter, as direct coding asks it
    alone = CECPipeline.load(tmp_path, direct=True)
    assert torch.allclose(result.direct_probs, alone.direct_probs(note, fine_tuned=True), atol=1e-6)
    assert not torch.allclose(result.direct_probs, alone.direct_probs(note, fine_tuned=False), atol=1e-3)
    expected = pipe.bottleneck.probs(result.concept_probs, result.direct_probs)
    assert result.code_probs.tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert result.timing["questions"] == len(pipe.concept_questions) + len(cs.codes)
    for j, c in enumerate(sorted(code_list(result, pipe), key=lambda c: cs.codes.index(c["code"]))):
        assert c["direct_question"]["probability"] == pytest.approx(float(result.direct_probs[j]), abs=1e-6)
        assert c["direct_question"]["contribution"] == pytest.approx(
            pipe.bottleneck.direct_term(result.direct_probs, j), abs=1e-4)
    from cec.coding.output import format_table, note_json

    assert "; direct question " in format_table(note_json(result, note, pipe), result.timing)
    # a sentence's score adds the drop of the direct question, times its weight
    spans = note_sentences(note)
    a = attribute(pipe, note, result, [0], per_code=None, gain=True)
    coef = torch.tensor([float(pipe.bottleneck.coefficients(result.concept_probs, 0)[i]) for i in a.concept_ids])
    for measure, got in (("drop", a.code_drops[0]), ("gain", a.code_gains[0])):
        want = (coef @ concept_effects(pipe, note, a.concept_ids, spans, measure)
                + pipe.bottleneck.direct * direct_question_effects(pipe, note, [0], spans, measure)[0])
        assert (got - want).abs().max().item() < 1e-4
        assert direct_question_effects(pipe, note, [0], spans, measure).abs().max() > 0


def test_pipeline_whose_linear_stage_also_reads_the_lexical_prior(cs, tmp_path):
    from tiny_train import save_tiny_model

    from cec.coding.attribution import attribute, concept_effects, lexical_effects, note_sentences
    from cec.coding.lexical import LexicalPrior
    from cec.coding.output import code_list, format_table, note_json
    from cec.coding.pipeline import CECPipeline

    save_tiny_model(tmp_path / "model")
    cs.save(tmp_path / "concepts.json")
    p, y = synthetic(cs)
    texts = worded(cs, y)
    prior = LexicalPrior.fit(texts, y, cs.codes, C=10.0)
    lexical = LexicalPrior.out_of_fold(texts, y, cs.codes, C=10.0)
    Bottleneck.fit(cs, p, y, l2=1.0, lexical_z=lexical, prior=prior).save(tmp_path / "bottleneck.json")
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({
        "base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json"), "threshold": 0.0,
        "label_stage": "linear", "bottleneck": "bottleneck.json", "k": 3, "negation": "on"}))
    torch.set_num_threads(1)
    pipe = CECPipeline.load(tmp_path)
    note = "Fever and word0 today.\nNo word1 at all.\nword0 again, noise3.\n"
    result = pipe.code_note(note)
    read = pipe.fit_note(note)  # negation blanks "No word1 at all": the prior reads the note as the model does
    assert "word1" not in read
    assert result.lexical_logits.tolist() == pytest.approx(prior.logits([read])[0].tolist(), abs=1e-5)
    expected = pipe.bottleneck.probs(result.concept_probs, lexical_z=result.lexical_logits)
    assert result.code_probs.tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    j0 = cs.codes.index(cs.codes[0])
    c0 = next(c for c in code_list(result, pipe) if c["code"] == cs.codes[0])
    assert c0["lexical_prior"]["contribution"] == pytest.approx(
        pipe.bottleneck.lexical_term(result.lexical_logits, j0), abs=1e-4)
    assert c0["lexical_prior"]["terms"][0]["ngram"] == "word0"
    assert "; words 'word0'" in format_table(note_json(result, note, pipe), result.timing)
    # a sentence's score adds the drop (gain) of the lexical logit, times its weight
    spans = note_sentences(note)
    a = attribute(pipe, note, result, [j0], per_code=None, gain=True)
    coef = torch.tensor([float(pipe.bottleneck.coefficients(result.concept_probs, j0)[i]) for i in a.concept_ids])
    for measure, got in (("drop", a.code_drops[0]), ("gain", a.code_gains[0])):
        lex = lexical_effects(pipe, note, [j0], spans, measure)[0]
        want = coef @ concept_effects(pipe, note, a.concept_ids, spans, measure) + pipe.bottleneck.lexical * lex
        assert (got - want).abs().max().item() < 1e-4
        assert lex[0] > 0 and lex[1] == 0  # the first word0 sentence pushes code 0 up; the blanked one reads nothing
    one = read.replace("word0 again, noise3.", " " * len("word0 again, noise3."))
    assert lexical_effects(pipe, note, [j0], spans, "drop")[0, 2].item() == pytest.approx(
        float(prior.logits([read])[0, j0] - prior.logits([one])[0, j0]), abs=1e-4)


def test_crossfit_fit_direct_without_fit_out_is_refused(tmp_path):
    """--fit-direct only says what the --fit-out bottleneck reads: alone it is an error, not silently nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "crossfit_eval.py"
    spec = importlib.util.spec_from_file_location("crossfit_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ConfigError, match="give --fit-out"):
        mod.main(["--notes", str(tmp_path / "n.jsonl"), "--train", str(tmp_path / "t.jsonl"), "--cache",
                  str(tmp_path / "s.jsonl"), "--fit-direct"])


def test_crossfit_names_the_label_llm_row_after_the_answers_its_adapter_was_trained_on(tmp_path, capsys,
                                                                                    monkeypatch):
    """--label-adapter overrides the pipeline's label adapter, and its row says whether it was trained on pseudo
    or predicted answers (cec_adapter.json "concept_answers"); with --train --lexical the bottleneck rows that also
    read the lexical prior (no ../shared: scores made up here; the bottleneck's fit replaced by a recorder, for
    speed, but in --fit-out)."""
    import importlib.util
    import shutil
    from pathlib import Path

    from cec.data import write_notes
    from cec.evaluation.score_cache import ScoreCache
    from cec.evaluation.systems import CONCEPTS, fingerprints, resolve_setup
    from tiny_train import made_up_stage1

    path = Path(__file__).resolve().parents[1] / "scripts" / "crossfit_eval.py"
    spec = importlib.util.spec_from_file_location("crossfit_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    extra = []  # the extra per-code scores each bottleneck row was given

    def fake_bottleneck(cs, concept_p, y, direct_p=None, also=None, lexical_z=None):
        extra.append(None if direct_p is None else direct_p.shape)
        if also is not None:
            extra.append(("also", len(also[0])) if len(also) == 2 else ("also+lexical", len(also[0]), also[2].shape))
        if lexical_z is not None:
            extra.append(("lexical", lexical_z.shape))
        return score_system(concept_p[:, : y.shape[1]], y)
    monkeypatch.setattr(mod, "bottleneck_system", fake_bottleneck)
    shipped = resolve_setup(None)
    adapter = tmp_path / "label-predicted"
    shutil.copytree(shipped.config.adapter("label"), adapter)
    meta = json.loads((adapter / "cec_adapter.json").read_text())
    (adapter / "cec_adapter.json").write_text(json.dumps({**meta, "concept_answers": "predicted"}))
    cs = shipped.concept_set
    keys = fingerprints(shipped, mod.LLM_SYSTEMS, "cpu", None)  # adapter bytes unchanged: the same keys
    rng = np.random.default_rng(0)
    notes, cache = [], ScoreCache(tmp_path / "scores.jsonl")
    for note, p in made_up_stage1(cs, 24, 4, rng):
        cache.put(CONCEPTS, keys[CONCEPTS], note, p)
        cache.put("cec-k5", keys["cec-k5"], note, [0.9 if c in note["labels"] else 0.1 for c in cs.codes])
        if len(notes) < 12:  # k=3 scored for half the notes only: its row says so
            cache.put("cec-k3", keys["cec-k3"], note, [0.8 if c in note["labels"] else 0.3 for c in cs.codes])
        notes.append(note)
    cache.close()
    write_notes(tmp_path / "dev.jsonl", notes)
    base = ["--notes", str(tmp_path / "dev.jsonl"), "--cache", str(tmp_path / "scores.jsonl")]
    rows = {r["system"]: r for r in mod.main(base)["systems"]}
    assert rows["CEC, label LLM, k=5 (pseudo answers) (raw)"]["notes"] == len(notes)
    assert rows["CEC, label LLM, k=3 (pseudo answers) (calibrated)"]["notes"] == 12
    assert not any("k=4" in name or "k=6" in name for name in rows)  # no scores, no row
    names = [r["system"] for r in mod.main(base + ["--label-adapter", str(adapter)])["systems"]]
    assert "CEC, label LLM, k=5 (predicted answers) (raw)" in names
    # with --train: TF-IDF alone; with --lexical too, the bottleneck reading the lexical prior fitted on train
    words = ["fever", "cough", "pain", "rash", "edema", "anemia"]
    train = [{"id": f"t{i}", "labels": list(cs.codes[i % 3: i % 3 + 1]),
              "text": f"Patient with {words[i % 3]} and {words[(i + 1) % 6]}. No {words[(i + 2) % 6]}."}
             for i in range(30)]
    write_notes(tmp_path / "train.jsonl", train)
    rows = {r["system"]: r for r in mod.main(base + ["--train", str(tmp_path / "train.jsonl")])["systems"]}
    assert "TF-IDF + LR (one-vs-rest)" in rows and not any("lexical" in r for r in rows)
    with pytest.raises(ConfigError, match="give --train"):
        mod.main(base + ["--lexical"])
    rows = {r["system"]: r for r in mod.main(base + ["--train", str(tmp_path / "train.jsonl"), "--lexical"])[
        "systems"]}
    assert rows["Concept bottleneck + lexical prior"]["notes"] == len(notes)
    assert ("lexical", (len(notes), len(cs.codes))) in extra  # one lexical logit per note and code
    # --fit-train: a row whose bottleneck also fits on the training notes the cache has stage-1 scores of
    with pytest.raises(DataError, match="only 0 notes"):
        mod.main(base + ["--train", str(tmp_path / "train.jsonl"), "--fit-train"])
    cache = ScoreCache(tmp_path / "scores.jsonl")
    for n in train[:12]:
        cache.put(CONCEPTS, keys[CONCEPTS], n, rng.uniform(0.01, 0.9, len(cs.concepts)).tolist())
    cache.close()
    extra.clear()
    rows = {r["system"]: r for r in mod.main(base + ["--train", str(tmp_path / "train.jsonl"), "--fit-train"])[
        "systems"]}
    assert "Concept bottleneck, fitted also on 12 training notes" in rows
    assert ("also", 12) in extra
    extra.clear()
    rows = {r["system"]: r for r in mod.main(base + ["--train", str(tmp_path / "train.jsonl"), "--fit-train",
                                                     "--lexical"])["systems"]}
    assert "Concept bottleneck + lexical prior, fitted also on 12 training notes" in rows
    assert ("also+lexical", 12, (12, len(cs.codes))) in extra  # the training notes' out-of-fold lexical logits
    with pytest.raises(ConfigError, match="give --train"):
        mod.main(base + ["--fit-train"])
    # --coder-labels: notes files with blanked_labels (negation_gold.py --coder-notes); every row is judged on all
    # gold, one more bottleneck row is fitted on the coder labels, dev and training notes alike
    coder = [n | {"labels": n["labels"][1:], "blanked_labels": n["labels"][:1]} for n in notes]
    write_notes(tmp_path / "dev_coder.jsonl", coder)
    write_notes(tmp_path / "train_coder.jsonl", [n | {"labels": [], "blanked_labels": n["labels"]} for n in train])
    fitted = []
    monkeypatch.setattr(mod, "bottleneck_system", lambda cs, p, y, direct_p=None, also=None, lexical_z=None: (
        fitted.append((y.sum(), None if also is None else also[1].sum())) or score_system(p[:, : y.shape[1]], y)))
    coder_base = ["--notes", str(tmp_path / "dev_coder.jsonl"), "--cache", str(tmp_path / "scores.jsonl"),
                  "--train", str(tmp_path / "train_coder.jsonl"), "--fit-train"]
    out = mod.main(coder_base + ["--coder-labels"])
    rows = {r["system"]: r for r in out["systems"]}
    gold_rows = {r["system"]: r for r in mod.main(base + ["--train", str(tmp_path / "train.jsonl"),
                                                          "--fit-train"])["systems"]}
    name = "Concept bottleneck, fitted also on 12 training notes"
    # all gold again (labels + blanked_labels), and the figures without the blanked pairs beside
    assert rows[name]["blanked_pairs"] == sum(len(n["blanked_labels"]) for n in coder)
    assert {k: v for k, v in rows[name].items() if "blanked" not in k} == gold_rows[name]
    assert rows[name + ", on coder labels"]["notes"] == len(notes)
    all_gold, coded = sum(len(n["labels"]) for n in notes), sum(len(n["labels"]) for n in coder)
    assert (coded, 0) in fitted and (all_gold, sum(len(n["labels"]) for n in train[:12])) in fitted
    assert "fitted" not in out  # no --fit-out, nothing fitted for shipping
    out = mod.main(coder_base + ["--coder-labels", "--fit-out", str(tmp_path / "coder.json")])
    assert out["fitted"]["labels"] == "coder" and out["fitted"]["train_notes"] == 12
    assert mod.main(coder_base + ["--fit-out", str(tmp_path / "gold.json")])["fitted"]["labels"] == "gold"
    out = mod.main(coder_base + ["--coder-labels", "--lexical", "--fit-out", str(tmp_path / "lexical.json")])
    assert out["fitted"]["lexical"] is not None and out["fitted"]["lexical_C"] is not None
    shipped_model = Bottleneck.load(tmp_path / "lexical.json", cs)  # with its prior, beside it
    assert shipped_model.lexical == out["fitted"]["lexical"] and shipped_model.prior.codes == cs.codes
    assert (tmp_path / "lexical.lexical.safetensors").exists()
    capsys.readouterr()
