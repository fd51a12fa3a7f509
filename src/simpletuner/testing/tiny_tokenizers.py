"""Tokenizers for the tiny test models, trained locally in well under a second.

No hub: a CLIP byte-level BPE is trained with the `tokenizers` library, a BERT WordPiece
vocabulary is built with its normaliser and pre-tokeniser, T5 (and mT5) and ChatGLM get
sentencepiece unigram models trained on generated prompts. The
prompts and the training are fixed, so the same tokenizers come out every time.
"""

from __future__ import annotations

import io
import random
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 128
CHATGLM_MAX_LENGTH = 128
BERT_MAX_LENGTH = 77  # Hunyuan-DiT's bilingual CLIP (a BERT) and its mT5, as its pipeline pads them
MT5_MAX_LENGTH = 256

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_SUBJECTS = (
    "cat", "dog", "fox", "owl", "horse", "robot", "dragon", "castle", "lighthouse", "bicycle",
    "woman", "man", "child", "old sailor", "astronaut", "knight", "wizard", "teapot", "sports car",
    "mountain lake", "city street", "forest path", "bowl of fruit", "sunflower", "whale", "train",
)
_ADJECTIVES = (
    "red", "blue", "green", "golden", "tiny", "giant", "ancient", "futuristic", "happy", "sleepy",
    "glowing", "rusty", "fluffy", "wet", "snowy", "misty", "colourful", "dark", "bright", "wooden",
)
_PLACES = (
    "in a field", "on the beach", "at sunset", "under the stars", "in the rain", "on a hill",
    "in a kitchen", "next to a river", "in Paris", "on Mars", "in a library", "at night",
)
_STYLES = (
    "oil painting", "photo", "watercolor", "pencil sketch", "3d render", "pixel art", "anime",
    "studio lighting", "35mm film", "8k, highly detailed", "soft focus", "cinematic",
)


def training_prompts(count: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic caption-like prompts with punctuation, digits and capitals."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        parts = [f"{rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)}"]
        if rng.random() < 0.7:
            parts.append(rng.choice(_PLACES))
        text = "A " + " ".join(parts) if rng.random() < 0.5 else " ".join(parts)
        styles = rng.sample(_STYLES, rng.randint(0, 3))
        text = ", ".join([text, *styles])
        if rng.random() < 0.2:
            text += f" ({rng.randint(1, 2030)})!"
        prompts.append(text)
    return prompts


def train_clip_tokenizer(prompts: list[str], vocab_size: int = 1000) -> Any:
    """A CLIP BPE tokenizer: every byte is in the vocabulary, so nothing maps to unknown.

    Ids: bos `<|startoftext|>` = 0, eos = pad = unk `<|endoftext|>` = 1 (padding with
    eos, as SD 1.x does). A CLIPTextConfig must use the same ids.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # carries CLIP's normaliser, pre-tokeniser and BPE settings
    backend = Tokenizer.from_str(template.backend_tokenizer.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[CLIP_BOS, CLIP_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(prompts, trainer=trainer)
    model = _json_model(backend)
    vocab = _ordered_vocab(set(model["vocab"]), model["merges"])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def build_bert_tokenizer(prompts: list[str]) -> Any:
    """A BERT WordPiece tokenizer (lower-casing, as bert-base-uncased): [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.

    The vocabulary is built, not trained (the `tokenizers` WordPiece trainer breaks ties in hash
    order, so two processes would disagree): every word of the prompts, as BERT's normaliser and
    pre-tokeniser split them, and every character alone and as a `##` continuation, so an unseen
    word is spelled out rather than unknown. Ids after the specials are in sorted order.
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = {word for prompt in prompts
             for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(prompt))}
    characters = {char for word in words for char in word}
    learned = sorted(words | characters | {f"##{char}" for char in characters})
    vocab = {token: index for index, token in enumerate([*BERT_SPECIALS, *learned])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.model_max_length = BERT_MAX_LENGTH
    return tokenizer


def _ordered_vocab(tokens: set[str], merges: list[list[str]]) -> dict[str, int]:
    """Ids in a fixed order (the trainer numbers its alphabet in hash order):
    specials, every byte `c` and `c</w>` as CLIP has them (a word ending in a
    character never seen word-final would otherwise be unknown, and CLIP's unknown
    is its eos, where the pooled output is read), then merges in training order."""
    from tokenizers import pre_tokenizers

    ordered = [CLIP_BOS, CLIP_EOS]
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        ordered += [char, char + "</w>"]
    ordered += ["".join(pair) for pair in merges]
    ordered += sorted(tokens)
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    return vocab


def _json_model(backend: Any) -> dict:
    import json

    return json.loads(backend.to_str())["model"]


def train_sentencepiece(prompts: list[str], vocab_size: int, **ids: int) -> bytes:
    """A serialised sentencepiece unigram model; `ids` sets pad_id/eos_id/unk_id/bos_id."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prompts),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return model.getvalue()


def t5_tokenizer_from_sentencepiece(model: bytes) -> Any:
    """A T5 tokenizer (pad=0, eos=1, unk=2, no sentinel ids) from a sentencepiece model."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    tokenizer = T5Tokenizer(
        vocab=vocab,
        extra_ids=0,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
    )
    tokenizer.model_max_length = T5_MAX_LENGTH
    return tokenizer


def chatglm_tokenizer_from_sentencepiece(model: bytes, workdir: Path) -> Any:
    """Kolors' ChatGLM tokenizer (unk=pad=0, bos=1, eos=2, left padding)."""
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    path = workdir / "tokenizer.model"
    path.write_bytes(model)
    tokenizer = ChatGLMTokenizer(vocab_file=str(path))
    tokenizer.model_max_length = CHATGLM_MAX_LENGTH
    return tokenizer


@dataclass
class TokenizerKit:
    """Trains each kind of tokenizer once and hands out the same object afterwards.

    Tokenizers do not depend on the weight seed, so one kit serves every family
    of a `build_all` call. `workdir` holds the ChatGLM sentencepiece file, which
    its tokenizer reads from disk.
    """

    prompts: list[str] = field(default_factory=training_prompts)
    _tmp: Any = field(default=None, init=False, repr=False)

    @cached_property
    def clip(self) -> Any:
        return train_clip_tokenizer(self.prompts)

    @cached_property
    def _t5_sentencepiece(self) -> bytes:
        return train_sentencepiece(self.prompts, 800, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)

    @cached_property
    def t5(self) -> Any:
        return t5_tokenizer_from_sentencepiece(self._t5_sentencepiece)

    @cached_property
    def mt5(self) -> Any:
        """Hunyuan-DiT's mT5 tokenizer in miniature: the T5 one, padded to the pipeline's 256 tokens."""
        tokenizer = t5_tokenizer_from_sentencepiece(self._t5_sentencepiece)
        tokenizer.model_max_length = MT5_MAX_LENGTH
        return tokenizer

    @cached_property
    def bert(self) -> Any:
        return build_bert_tokenizer(self.prompts)

    @cached_property
    def chatglm(self) -> Any:
        model = train_sentencepiece(self.prompts, 800, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        self._tmp = tempfile.TemporaryDirectory(prefix="tiny-chatglm-")
        return chatglm_tokenizer_from_sentencepiece(model, Path(self._tmp.name))
