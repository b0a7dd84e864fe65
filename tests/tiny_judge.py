"""A tiny Qwen2.5-VL judge whose greedy answer is forced by construction, converted into a judge folder.

Every layer's o_proj and down_proj are zero, so the residual stream at a position is its token's embedding (the
attention and MLP add nothing) and the next token depends on the current token alone. The tokens of the chain
c_0 -> c_1 -> ... -> <|im_end|> (c_0: the last token of the chat template's generation prompt, then the answer's
tokens, all distinct) get orthogonal embeddings e_j (one-hot in dimension j), the final norm's weight is one and
lm_head's row of c_{j+1} is 10 e_j (every other row zero): at c_j the logit of c_{j+1} is 10 sqrt(hidden), every
other logit 0, so greedy decoding spells the answer and stops, whatever the prompt and images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxedit.tokenizers_offline import SENTENCES
from tests.tiny_qwen import MAX_PIXELS, MIN_PIXELS, build_tiny_qwen_vl


def chain(tok, answer: str) -> list[int]:
    """[last prompt token, answer's tokens..., <|im_end|>]; AssertionError unless all distinct."""
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                     tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = [tok(prompt)["input_ids"][-1], *tok(answer)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(ids)) == len(ids), f"tokens of {answer!r} repeat: {ids}"
    assert tok.decode(ids[1:-1]) == answer
    return ids


def build_forced_judge(root: Path, answer: str, *, sentences: list[str] = ()) -> Path:
    """A transformers folder at root/hf answering `answer`, converted to the judge folder root/judge by
    `python -m checkpoints_convert qwen-vl` (its main)."""
    import transformers
    from safetensors.numpy import load_file, save_file

    from checkpoints_convert.__main__ import main

    hf = root / "hf"
    build_tiny_qwen_vl(hf, [*SENTENCES, *sentences], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = chain(tok, answer)
    files = sorted(hf.glob("*.safetensors"))
    assert len(files) == 1
    sd = load_file(files[0])
    emb_key = next(k for k in sd if k.endswith("embed_tokens.weight"))
    hidden = sd[emb_key].shape[1]
    assert len(ids) <= hidden, (len(ids), hidden)
    for k in sd:
        if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) and "visual" not in k:
            sd[k] = np.zeros_like(sd[k])
    sd[emb_key][ids] = 0
    lm = np.zeros_like(sd["lm_head.weight"])
    for j, t in enumerate(ids):
        sd[emb_key][t, j] = 1.0
        if j + 1 < len(ids):
            lm[ids[j + 1], j] = 10.0
    sd["lm_head.weight"] = lm
    norm = next(k for k in sd if k.endswith("language_model.norm.weight") or k == "model.norm.weight")
    sd[norm] = np.ones_like(sd[norm])
    save_file(sd, files[0], metadata={"format": "pt"})
    assert main(["qwen-vl", str(hf), str(root / "judge")]) == 0
    return root / "judge"
