"""The embedded default, Gemma 3 270M from the PyPI GGUF: our logits equal transformers' logits read from the
same file, and the model is a working language model on medical text. Slow (transformers takes about 75 s and
3.3 GB to read the GGUF), so transformers' model is built once per module."""
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CLINICAL_NOTE = """\
HISTORY OF PRESENT ILLNESS: The patient is a 68-year-old woman with a history of hypertension, type 2 diabetes
mellitus on insulin, chronic kidney disease stage 3 and atrial fibrillation on warfarin, who presented to the
emergency department with three days of progressive shortness of breath, orthopnea and bilateral leg swelling.
She reports a weight gain of 4 kg over the past week and reduced urine output. She denies chest pain, fever or
cough. On arrival her blood pressure was 168/94 mmHg, heart rate 112 beats per minute and irregular, respiratory
rate 24, temperature 36.8 C, and oxygen saturation 89% on room air, improving to 95% on 3 liters by nasal cannula.

PHYSICAL EXAMINATION: Jugular venous pressure elevated to the angle of the jaw. Bibasilar crackles to the
mid-lung fields. Irregularly irregular rhythm with a soft systolic murmur at the apex. Pitting edema to the knees.

LABORATORY DATA: Sodium 134, potassium 5.1, creatinine 2.1 (baseline 1.4), BNP 1850, troponin I 0.04, INR 3.2,
hemoglobin 10.9. Chest radiograph showed cardiomegaly with bilateral pleural effusions and pulmonary vascular
congestion. Echocardiogram showed an ejection fraction of 35% with moderate mitral regurgitation.

HOSPITAL COURSE: She was treated for acute on chronic systolic heart failure with intravenous furosemide 40 mg
twice daily with good diuresis, and her oxygen requirement resolved by day three. Rate control of atrial
fibrillation was achieved with metoprolol. Warfarin was held for a supratherapeutic INR and resumed at a lower
dose. Her creatinine peaked at 2.4 and returned to 1.7 at discharge, consistent with acute kidney injury from
cardiorenal physiology.

DISCHARGE DIAGNOSES: Acute on chronic systolic congestive heart failure; atrial fibrillation with rapid
ventricular response; acute kidney injury on chronic kidney disease stage 3; hypertension; type 2 diabetes."""

MEDICAL_PARAGRAPH = (
    "Hypertension is a chronic medical condition in which the blood pressure in the arteries is persistently "
    "elevated. High blood pressure usually does not cause symptoms, but it is a major risk factor for stroke, "
    "heart failure, coronary artery disease and chronic kidney disease. Treatment includes lifestyle changes "
    "such as reducing salt intake and regular exercise, and medications such as diuretics, ACE inhibitors and "
    "calcium channel blockers.")


@pytest.fixture(scope="module")
def ours():
    from cec.engine.weights import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def hf_reference():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read a GGUF file")
    from transformers import AutoModelForCausalLM

    from cec.engine.weights import embedded_gguf_path

    path = Path(embedded_gguf_path("gemma3-270m"))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_config_and_tokenizer(ours):
    model, tok = ours
    cfg = model.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("gemma3_text", 18, 640, 4, 1)
    assert (cfg.head_dim, cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (256, 512, 1e6, 1e4)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.tie_word_embeddings
    assert model.dtype == torch.float32 and tok.bos_id == 2 and tok.eos_ids == [1]


def test_logits_equal_transformers(ours, hf_reference):
    model, tok = ours
    ids = tok.encode(CLINICAL_NOTE)
    assert 280 <= len(ids) <= 600, len(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_reference(x).logits[0]
        out = model.logits(model(x))[0]
    diff = (out - ref).abs().max().item()
    assert diff < 1e-3, diff
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_perplexity_on_medical_text(ours):
    model, tok = ours
    ids = torch.tensor([tok.encode(MEDICAL_PARAGRAPH)])
    with torch.no_grad():
        logits = model.logits(model(ids))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    ppl = math.exp(nll.item())
    assert ppl < 20, ppl


def test_shipped_pipeline_codes_a_note(ours):
    """The shipped pipeline folder loads onto the embedded model (every adapter fits it and the concept set's
    codes), its label layout is the one its label adapter was trained with, and it codes a note with evidence."""
    from cec.engine.lora import load_adapter
    from cec.coding.output import code_list
    from cec.coding.pipeline import DEFAULT_PIPELINE, CECPipeline, PipelineConfig, share_base, trained_layout

    model, tokenizer = ours
    config, folder = PipelineConfig.load(DEFAULT_PIPELINE)
    for rel in (config.concept_adapter, config.label_adapter, config.direct_adapter):
        assert rel and (folder / rel).is_dir(), rel
    _, meta = load_adapter(share_base(model), folder / config.direct_adapter)
    assert meta["stage"] == "direct"
    assert config.label_stage == "linear" and (folder / config.bottleneck).is_file()
    for stage in ("linear", "llm"):  # the default stage 2, and the label LLM it replaced
        pipe = CECPipeline.load(model=share_base(model), tokenizer=tokenizer,  # the fixture's model stays unadapted
                                label_stage=stage, threshold=config.threshold)
        assert pipe.layout == (config.label_layout or trained_layout(folder / config.label_adapter))
        assert (pipe.calibration is not None) == (stage == "linear")
        result = pipe.code_note(CLINICAL_NOTE)
        cs = pipe.cs
        codes = code_list(result, pipe)
        assert sorted(c["code"] for c in codes) == sorted(cs.codes)
        texts = {c.text: c.id for c in cs.concepts}
        for c in codes:
            assert 0.0 <= c["probability"] <= 1.0
            assert c["predicted"] == (c["probability"] >= config.threshold)
            shown = [texts[e["concept"]] for e in c["evidence"]]
            own = set(cs.concept_ids(c["code"]))
            if stage == "linear":  # the code's own concepts with the largest terms of its logit
                assert set(shown) <= own and len(shown) == min(config.k, len(own))
            else:
                assert len(shown) <= config.k + config.m and len(set(shown) & own) == min(config.k, len(own))
        extra = len(cs.codes) if stage == "llm" else 0
        assert result.timing["questions"] == len(cs.concepts) + extra
