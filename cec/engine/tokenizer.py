"""One Tokenizer over three sources: tokenizer.json (tokenizers), tokenizer.model (sentencepiece), and a GGUF
vocabulary, which is rebuilt as a `tokenizers` model the way transformers rebuilds it, then saved as tokenizer.json.

BOS is ours to add (`encode(text, add_bos=True)`), never a post-processor's, so every source behaves the same.
"""
from __future__ import annotations

import json
from pathlib import Path

from cec.errors import TokenizerError
from cec.io import atomic_write_json, atomic_write_text

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

BOS_CANDIDATES = ("<|begin_of_text|>", "<bos>", "<s>")
EOS_CANDIDATES = ("<|end_of_text|>", "<eos>", "</s>")
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>")


class Tokenizer:
    """encode/decode plus the special ids the rest of the engine needs (bos_id, eos_ids, pad_id)."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], pad_id: int | None,
                 add_bos: bool = True, source: str = ""):
        self.backend = backend  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
        self.bos_id, self.eos_ids, self.pad_id = bos_id, list(eos_ids), pad_id
        self.add_bos = add_bos and bos_id is not None  # whether the model expects a BOS at all
        self.source = source
        self._spm = type(backend).__name__ == "SentencePieceProcessor"

    # -- use -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self._spm:
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.backend.encode(text, out_type=int) if self._spm else \
            self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = True) -> list[list[int]]:
        if self._spm:
            return [self.encode(t, add_bos) for t in texts]
        bos = [self.bos_id] if add_bos and self.add_bos else []
        return [bos + e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._spm:
            if skip_special:
                ids = [i for i in ids if not self.backend.is_control(i)]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        if self._spm:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.backend.id_to_piece(i) if self._spm else self.backend.id_to_token(i)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"

    # -- load / save -----------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """An HF folder: tokenizer.json or tokenizer.model, special tokens from tokenizer_config.json,
        special_tokens_map.json, config.json and generation_config.json."""
        folder = Path(folder)
        meta = {}
        for name in ("config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json"):
            meta[name] = _read_json(folder / name) if (folder / name).is_file() else {}
        if (folder / "tokenizer.json").is_file():
            backend = _load_json_backend(folder / "tokenizer.json")
            source = str(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            backend = _load_spm_backend(folder / "tokenizer.model")
            source = str(folder / "tokenizer.model")
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {folder}")
        return cls._with_specials(backend, meta, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A lone tokenizer.json or tokenizer.model; special tokens from the files beside it when present."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        meta = {n: _read_json(path.parent / n) if (path.parent / n).is_file() else {}
                for n in ("config.json", "generation_config.json", "special_tokens_map.json",
                          "tokenizer_config.json")}
        backend = _load_spm_backend(path) if path.suffix == ".model" else _load_json_backend(path)
        return cls._with_specials(backend, meta, str(path))

    @classmethod
    def _with_specials(cls, backend, meta: dict, source: str) -> "Tokenizer":
        tmp = cls(backend, bos_id=None, eos_ids=[], pad_id=None, source=source)
        cfg, gen = meta["config.json"], meta["generation_config.json"]
        tok_cfg = {**meta["special_tokens_map.json"], **meta["tokenizer_config.json"]}
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            cfg = {**cfg, **cfg["text_config"]}

        def tid(name):
            t = tok_cfg.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            return tmp.token_to_id(t) if isinstance(t, str) else None

        bos = tid("bos_token")
        if bos is None:
            bos = _first_int(cfg.get("bos_token_id"), gen.get("bos_token_id"))
        if bos is None and tmp._spm and backend.bos_id() >= 0:
            bos = backend.bos_id()
        if bos is None:
            bos = _first_known(tmp, BOS_CANDIDATES)
        eos = []
        for v in (tid("eos_token"), cfg.get("eos_token_id"), gen.get("eos_token_id")):
            for i in v if isinstance(v, list) else [v]:
                if isinstance(i, int) and i not in eos:
                    eos.append(i)
        if not eos and tmp._spm and backend.eos_id() >= 0:
            eos = [backend.eos_id()]
        if not eos and (e := _first_known(tmp, EOS_CANDIDATES)) is not None:
            eos = [e]
        pad = tid("pad_token")
        if pad is None:
            pad = _first_int(cfg.get("pad_token_id"), gen.get("pad_token_id"))
        if pad is None and tmp._spm and backend.pad_id() >= 0:
            pad = backend.pad_id()
        if pad is None:
            pad = _first_known(tmp, PAD_CANDIDATES)
        add_bos = tok_cfg.get("add_bos_token", True)
        return cls(backend, bos_id=bos, eos_ids=eos, pad_id=pad, add_bos=bool(add_bos), source=source)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """From a GGUF's metadata (key -> Python value, as cec.engine.weights.gguf_metadata returns)."""
        backend = build_gguf_backend(meta)
        tokens = meta["tokenizer.ggml.tokens"]  # present: build_gguf_backend checked

        def special(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

        eos = [special("eos_token_id")] if special("eos_token_id") is not None else []
        eot = special("eot_token_id")  # Llama 3 instruct: <|eot_id|>
        if eot is not None and eot not in eos:
            eos.append(eot)
        return cls(backend, bos_id=special("bos_token_id"), eos_ids=eos, pad_id=special("padding_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), source="gguf")

    def save(self, folder: str | Path, tokenizer_class: str | None = None) -> None:
        """tokenizer.json plus an HF-style tokenizer_config.json (tokenizers backends only), written atomically."""

        if self._spm:
            raise TokenizerError("save() writes tokenizer.json; a sentencepiece tokenizer is saved by copying "
                                 "its tokenizer.model")
        folder = Path(folder)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        name = lambda i: self.id_to_token(i) if i is not None else None  # noqa: E731
        cfg = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
               "add_bos_token": self.add_bos, "add_eos_token": False}
        if tokenizer_class:
            cfg["tokenizer_class"] = tokenizer_class
        atomic_write_json(folder / "tokenizer_config.json", cfg)


def train_byte_bpe(corpus, vocab_size: int, source: str) -> Tokenizer:
    """A byte-level BPE tokenizer learned from `corpus` (strings), with <pad>=0, <eos>=1, <bos>=2: the tokenizer of
    tiny random models (tests, scripts/soak_batch.py)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, bos_id=2, eos_ids=[1], pad_id=0, source=source)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None


def _load_json_backend(path: Path):
    from tokenizers import Tokenizer as Backend

    try:
        return Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else e}") from None


def _load_spm_backend(path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot read sentencepiece model {path}: {str(e).splitlines()[0]}") from None
    return sp


def _first_int(*values) -> int | None:
    for v in values:
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return None


def _first_known(tok: Tokenizer, candidates) -> int | None:
    for c in candidates:
        if (i := tok.token_to_id(c)) is not None:
            return i
    return None


# -- GGUF vocabularies ---------------------------------------------------------------------------------
# llama.cpp's pre-tokenizer names -> the split regex of the byte-level BPE models (as transformers maps them)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def build_gguf_backend(meta: dict):
    """A `tokenizers.Tokenizer` equal to the one transformers builds from the same GGUF.

    - tokenizer model "llama" (SentencePiece-style BPE: tokens and scores, no merges): merges are recovered from
      the vocabulary. Gemma files list tokens in merge order (their scores do not follow it) and store runs of
      spaces as real spaces, which the Gemma tokenizer spells with U+2581; Gemma's normalizer turns spaces into
      U+2581 and adds no dummy prefix. Other architectures get the Llama 2 layout (Metaspace, dummy prefix per
      `add_space_prefix`), merges ordered by score.
    - tokenizer model "gpt2" (Llama 3): byte-level BPE with the file's merges and the split regex of its
      pre-tokenizer name.
    Control tokens become special added tokens, user-defined tokens plain added tokens (matched whole).
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    kind = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture", "")
    if not meta.get("tokenizer.ggml.tokens"):
        raise TokenizerError("GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "llama":
        gemma = arch.startswith("gemma")
        if gemma:
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
            order = {t: -i for i, t in enumerate(tokens)}
        else:
            order = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [-i for i in range(len(tokens))]))
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        unk_token = tokens[int(unk)] if unk is not None else "<unk>"
        backend = Backend(BPE(vocab=vocab, merges=merges_from_vocab(vocab, order), fuse_unk=True,
                              unk_token=unk_token, byte_fallback=True, dropout=None))
        if gemma:
            backend.normalizer = normalizers.Replace(" ", "\u2581")
            backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
            backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                 decoders.Fuse()])
        else:
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    elif kind == "gpt2":
        merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
        if not merges:
            raise TokenizerError("GGUF byte-level vocabulary has no tokenizer.ggml.merges")
        backend = Backend(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                              fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""), _LLAMA3_SPLIT)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}; supported: llama (SentencePiece), gpt2")
    original = list(meta["tokenizer.ggml.tokens"])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(original, types) if ty == CONTROL])
    known = backend.get_vocab(with_added_tokens=False)
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(original, types) if ty == USER_DEFINED and t in known])
    return backend


def merges_from_vocab(vocab: dict[str, int], order: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best token first
    (higher `order` value first; ties: shorter left piece, then shorter right piece; then vocabulary order)."""
    merges = []
    for token, score in order.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((score, left, right) for left, right in local)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]
