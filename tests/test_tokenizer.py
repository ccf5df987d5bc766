"""Our Tokenizer gives the ids transformers gives, for tokenizer.json, tokenizer.model and GGUF vocabularies."""
import io
import json

import pytest

from cec.errors import TokenizerError
from cec.engine.tokenizer import Tokenizer

SAMPLES = [
    "Patient is a 67-year-old male with a history of hypertension, type 2 diabetes mellitus and CKD stage 3.",
    "Vancomycin 15 mg/kg IV q12h; BP 120/80 mmHg, HR 88 bpm, SpO2 94% on 2 L NC.",
    "Temp 38.5 °C (101.3 °F). Creatinine 1.8 mg/dL (baseline 1.2). K+ 5.6 mEq/L, Na 132, 250 µg/mL.",
    "Dx: ICD-9 428.0, 584.9; ICD-10 I50.9, N17.9. s/p CABG x3 (2015). WBC 12.3 × 10⁹/L.",
    "Café-au-lait spots; naïve T cells; β-blocker; α1-antitrypsin; ≤ 5; Ärztlicher Bericht: Übelkeit.",
    "患者有高血压病史，入院诊断为肺炎。 Niño con fiebre de 39 °C.",
    "Assessment:\n\n1. Sepsis\n2. AKI\n\n\nPlan:\tcontinue   abx,\t\tmonitor  \n  labs  \r\n",
    "   leading and trailing spaces   ",
    "Emoji 🙂, symbols ™ © ½ ‰ — “quotes” ‘single’ … and a URL https://example.org/a?b=1.",
    "ALL CAPS HPI: PT C/O SOB, DOE, PND. NKDA. Hx of MI (2010), HTN, HLD.",
    "",
    " ",
    "\n",
    "x",
]

CORPUS = "\n".join(SAMPLES[:6] + [
    "The patient was admitted with chest pain and shortness of breath, and treated for pneumonia.",
    "Discharge diagnosis: acute kidney injury, congestive heart failure, atrial fibrillation.",
    "History of present illness: fever, cough and dyspnea for three days; no recent travel.",
]) * 10


def _hf_ids(hf, text):
    return hf(text)["input_ids"]


# -- tokenizer.json ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama3_style_folder(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json shaped like Llama 3's (BOS from a post-processor)."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    from cec.engine.tokenizer import _LLAMA3_SPLIT

    folder = tmp_path_factory.mktemp("llama3_tok")
    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 0,
                                                    "eos_token_id": [1, 2]}))
    return folder


def test_tokenizer_json_matches_transformers(llama3_style_folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llama3_style_folder))
    ours = Tokenizer.from_folder(llama3_style_folder)
    assert ours.bos_id == 0 and ours.eos_ids == [1, 2]
    for text in SAMPLES:
        assert ours.encode(text) == _hf_ids(hf, text), text
        assert ours.encode(text, add_bos=False) == _hf_ids(hf, text)[1:]
        assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.encode_batch(SAMPLES) == [ours.encode(t) for t in SAMPLES]
    assert ours.vocab_size == len(hf)


# -- tokenizer.model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A tiny SentencePiece BPE model laid out like Llama 2 / Gemma's (byte fallback, identity normalization)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm_tok")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2, num_threads=1)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    return folder


def test_sentencepiece_matches_transformers(spm_folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(spm_folder))
    ours = Tokenizer.from_folder(spm_folder)
    assert ours.backend.__class__.__name__ == "SentencePieceProcessor"
    assert (ours.bos_id, ours.eos_ids, ours.vocab_size) == (1, [2], 420)
    for text in SAMPLES:
        if text.startswith(" "):
            # sentencepiece (our backend, the reference) adds its dummy prefix before a leading space too;
            # transformers' Metaspace(prepend_scheme="first") skips it: " x" -> [▁ ▁ x] vs [▁ x]
            assert ours.encode(text) == [1] + ours.backend.encode(text), text
            continue
        assert ours.encode(text) == _hf_ids(hf, text), text
    assert ours.decode(ours.encode("BP 120/80 mmHg, 38.5 °C, 患者")) == "BP 120/80 mmHg, 38.5 °C, 患者"


# -- GGUF vocabularies (tiny files written here) ----------------------------------------------------------
def _write_vocab_gguf(path, arch, meta_fn):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    meta_fn(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def test_gguf_llama_sentencepiece_vocab_matches_transformers(spm_folder, tmp_path):
    """A Llama-2-style GGUF vocabulary (tokens, scores, types; no merges) from the tiny SentencePiece model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from cec.engine.weights import gguf_metadata

    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)

    def meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(True)

    _write_vocab_gguf(tmp_path / "vocab.gguf", "llama", meta)
    import gguf

    ours = Tokenizer.from_gguf_metadata(gguf_metadata(gguf.GGUFReader(tmp_path / "vocab.gguf")))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="vocab.gguf")
    assert (ours.bos_id, ours.eos_ids) == (1, [2])
    for text in SAMPLES:
        assert ours.encode(text) == _hf_ids(hf, text), text
        assert ours.decode(ours.encode(text, add_bos=False)) == hf.decode(_hf_ids(hf, text)[1:])


def test_gguf_byte_level_vocab_matches_transformers(llama3_style_folder, tmp_path):
    """A Llama-3-style GGUF vocabulary (tokenizer model gpt2, merges, pre-tokenizer llama-bpe)."""
    import gguf
    from transformers import AutoTokenizer

    from cec.engine.weights import gguf_metadata

    spec = json.loads((llama3_style_folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]

    def meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)  # as Llama 3 GGUFs state it

    _write_vocab_gguf(tmp_path / "vocab.gguf", "llama", meta)
    ours = Tokenizer.from_gguf_metadata(gguf_metadata(gguf.GGUFReader(tmp_path / "vocab.gguf")))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="vocab.gguf")
    assert ours.bos_id == 0 and ours.id_to_token(ours.bos_id) == "<|begin_of_text|>"
    ref = Tokenizer.from_folder(llama3_style_folder)
    for text in SAMPLES:
        assert ours.encode(text) == _hf_ids(hf, text) == ref.encode(text), text
        assert ours.decode(ours.encode(text, add_bos=False)) == text


@pytest.mark.slow
def test_embedded_gemma3_gguf_tokenizer_matches_transformers():
    """The embedded Gemma 3 vocabulary (262k SentencePiece-style tokens), rebuilt and cached by us, against
    transformers' tokenizer read from the same GGUF file."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from cec.engine.weights import embedded_gguf_path, resolve

    gguf_path = Path(embedded_gguf_path("gemma3-270m"))
    ours = Tokenizer.from_folder(resolve("gemma3-270m"))
    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (2, [1], 0)
    assert ours.vocab_size == len(hf) == 262144
    texts = SAMPLES + ["<bos> literal special tokens <eos> in text <start_of_turn>user\n",
                       " ".join(SAMPLES), "\t\t  \n\n\n\n  \t x  " * 3]
    for text in texts:
        assert ours.encode(text) == _hf_ids(hf, text), text
        assert ours.decode(ours.encode(text)) == hf.decode(_hf_ids(hf, text)), text
    # Gemma adds no dummy prefix: a word at the start and after a space are different tokens
    assert ours.encode("Yes", add_bos=False) != ours.encode(" Yes", add_bos=False)


# -- errors -----------------------------------------------------------------------------------------------
def test_missing_and_corrupt_tokenizers(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TokenizerError, match="cannot read sentencepiece model"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_save_round_trip(llama3_style_folder, tmp_path):
    ours = Tokenizer.from_folder(llama3_style_folder)
    ours.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (ours.bos_id, ours.eos_id, ours.vocab_size)
    assert [again.encode(t) for t in SAMPLES] == [ours.encode(t) for t in SAMPLES]
