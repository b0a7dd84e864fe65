"""Small CLIP-, T5- and Qwen2-style tokenizers trained offline (nothing downloaded).

For tests, demos and small models trained with jaxedit: a Unigram tokenizer saved as a
transformers T5Tokenizer (`tokenizer_2/`) and a byte-level BPE with CLIP's pre-tokenizer
saved in the original CLIP release layout (`tokenizer/`: vocab.json, merges.txt); a
byte-level BPE with Qwen2's pre-tokenizer, special tokens and Qwen2-VL chat template (tiny
Qwen2.5-VL models for Step1X-Edit tests).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SENTENCES = [
    "a photo of a cat sitting on a red sofa",
    "turn the sky into a starry night over the old town",
    "make the dog wear a small blue hat and a scarf",
    "remove the person standing on the left side of the picture",
    "add snow to the mountains, the roofs and the pine trees",
    "the quick brown fox jumps over the lazy dog 12 times!",
]


def train_tokenizers(
    root: Path,
    sentences: Sequence[str] = SENTENCES,
    t5_vocab: int = 200,
    clip_vocab: int = 400,
    *,
    whole_words: bool = False,
) -> None:
    """A Unigram tokenizer as T5's (`tokenizer_2/`) and a byte-level BPE as CLIP's (`tokenizer/`).

    whole_words: give the Unigram model every word of `sentences` as one piece (plus single
    characters as a fallback), for a small closed vocabulary; the Unigram trainer on a few
    hundred short sentences otherwise keeps mostly single characters.
    """
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    if whole_words:
        words = sorted({w for s in sentences for w in s.split()})
        chars = sorted({c for w in words for c in w})
        vocab = specials + [("\u2581" + w, -1.0) for w in words] + [("\u2581", -4.0)] + [(c, -5.0) for c in chars]
        if len(vocab) > t5_vocab:
            raise ValueError(f"{len(vocab)} whole-word pieces exceed t5_vocab {t5_vocab}")
    else:
        uni = Tokenizer(models.Unigram())
        uni.pre_tokenizer = pre_tokenizers.Metaspace()
        uni.train_from_iterator(
            list(sentences) * 3,
            trainers.UnigramTrainer(vocab_size=t5_vocab, special_tokens=[s for s, _ in specials], unk_token="<unk>"),
        )
        vocab = [tuple(v) for v in json.loads(uni.to_str())["model"]["vocab"]]
    t5_tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    t5_tok.save_pretrained(root / "tokenizer_2")

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenizer
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=clip_vocab, end_of_word_suffix="</w>", initial_alphabet=alphabet)
    bpe.train_from_iterator([s.lower() for s in sentences] * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    clip_vocab = _canonical_alphabet_order(model["vocab"], model["merges"], len(alphabet))
    for special in ("<|startoftext|>", "<|endoftext|>"):  # last ids, as in CLIP (EOS = largest id)
        clip_vocab[special] = len(clip_vocab)
    # FLUX's `tokenizer/` layout (files of the original CLIP release): vocab.json, merges.txt, tokenizer_config.json
    clip_dir = root / "tokenizer"
    clip_dir.mkdir(parents=True)
    (clip_dir / "vocab.json").write_text(json.dumps(clip_vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=77, unk_token="<|endoftext|>", **special)
    (clip_dir / "tokenizer_config.json").write_text(json.dumps(config))


def _canonical_alphabet_order(vocab: dict[str, int], merges: list, alphabet: int) -> dict[str, int]:
    """The BPE trainer adds the word-final characters ("e</w>", ...) after the byte alphabet in hash
    order, which changes between runs; give that block of ids in sorted order, so the same
    sentences always give the same vocab.json (merges.txt is already deterministic)."""
    made = {a + b for a, b in (m.split(" ") if isinstance(m, str) else m for m in merges)}
    block = sorted((i, t) for t, i in vocab.items() if i >= alphabet and t not in made)
    ids = [i for i, _ in block]
    if ids != list(range(alphabet, alphabet + len(ids))):
        raise ValueError("unexpected BPE vocabulary layout: the word-final characters are not one block")
    out = dict(vocab)
    for i, t in zip(ids, sorted(t for _, t in block)):
        out[t] = i
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_VL_CHAT_TEMPLATE = (  # the Qwen2-VL / Qwen2.5-VL processor template (chat_template.json)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def train_qwen_tokenizer(out: Path, sentences: Sequence[str] = SENTENCES, vocab: int = 600) -> dict[str, int]:
    """A byte-level BPE with Qwen2's pre-tokenizer saved as a transformers Qwen2Tokenizer (with
    Qwen2-VL's special tokens and chat template) at `out`; returns the special tokens' ids.

    Trained on `sentences` plus curly-quoted text, so “ and ” are single tokens as in Qwen2.
    """
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    extra = ["\u201c\u201d" * 8, "a sign that says \u201cOPEN\u201d", 'write "Hi" on it']
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((list(sentences) + extra) * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return dict(zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
