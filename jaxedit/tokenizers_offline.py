"""Small CLIP- and T5-style tokenizers trained offline (nothing downloaded).

For tests, demos and small models trained with jaxedit: a Unigram tokenizer saved as a
transformers T5Tokenizer (`tokenizer_2/`) and a byte-level BPE with CLIP's pre-tokenizer
saved in the original CLIP release layout (`tokenizer/`: vocab.json, merges.txt).
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
    root: Path, sentences: Sequence[str] = SENTENCES, t5_vocab: int = 200, clip_vocab: int = 400
) -> None:
    """A Unigram tokenizer as T5's (`tokenizer_2/`) and a byte-level BPE as CLIP's (`tokenizer/`)."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.train_from_iterator(
        list(sentences) * 3,
        trainers.UnigramTrainer(vocab_size=t5_vocab, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"),
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
    trainer = trainers.BpeTrainer(
        vocab_size=clip_vocab, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([s.lower() for s in sentences] * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    clip_vocab = dict(model["vocab"])
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
