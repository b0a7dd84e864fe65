"""Text encoder benchmark: jaxedit's T5 encoder and CLIP text tower versus transformers.

Encodes a batch of prompts (token ids padded as FLUX pads them: T5 to --t5-tokens, CLIP
to 77) with a small random config of each model, float32, same weights (saved by
transformers, read by our converters), same machine, one run; prints the median time of
each side, their ratio and the agreement of the outputs.

    python benchmarks/text_encoders.py [--batch 4] [--width 512] [--layers 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import rel, timed  # benchmarks/common.py

from jaxedit.configs import CLIPTextConfig, T5Config
from jaxedit.models import CLIPTextModel, T5Encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=512, help="T5 d_model and CLIP hidden size (heads of 64)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--t5-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch
    import transformers

    from checkpoints_convert import load_clip, load_t5

    w, heads = args.width, args.width // 64
    t5_cfg = T5Config(vocab_size=1000, d_model=w, d_kv=64, d_ff=2 * w, num_layers=args.layers, num_heads=heads)
    clip_cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=w, intermediate_size=4 * w, num_layers=args.layers, num_heads=heads
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); transformers {transformers.__version__}"
    )
    print(
        f"config: width {w}, {heads} heads, {args.layers} layers (T5 d_ff {t5_cfg.d_ff}, CLIP mlp "
        f"{clip_cfg.intermediate_size}); batch {args.batch}, T5 {args.t5_tokens} tokens, CLIP 77 tokens, float32"
    )

    ref_t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=1000,
            d_model=w,
            d_kv=64,
            d_ff=2 * w,
            num_layers=args.layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    ).eval()
    ref_clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1000,
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        )
    ).eval()
    with tempfile.TemporaryDirectory() as d:
        ref_t5.save_pretrained(f"{d}/t5")
        ref_clip.save_pretrained(f"{d}/clip")
        t5_params, clip_params = load_t5(f"{d}/t5", t5_cfg), load_clip(f"{d}/clip", clip_cfg)

    rng = np.random.default_rng(0)
    t5_ids = rng.integers(3, 999, (args.batch, args.t5_tokens))
    t5_ids[:, 40:] = 0  # padding as FLUX feeds it (no mask)
    clip_ids = rng.integers(3, 998, (args.batch, 77))
    clip_ids[:, 30:] = 999  # EOS (largest id) then EOS-padding

    t5_fn = jax.jit(lambda p, ids: T5Encoder(t5_cfg).apply({"params": p}, ids))
    clip_fn = jax.jit(lambda p, ids: CLIPTextModel(clip_cfg).apply({"params": p}, ids)[1])
    j5, jc = jnp.asarray(t5_ids, jnp.int32), jnp.asarray(clip_ids, jnp.int32)

    def ours():
        return t5_fn(t5_params, j5).block_until_ready(), clip_fn(clip_params, jc).block_until_ready()

    tt5, tclip = torch.from_numpy(t5_ids), torch.from_numpy(clip_ids)

    def theirs():
        with torch.no_grad():
            return ref_t5(tt5).last_hidden_state, ref_clip(tclip).pooler_output

    t0 = time.perf_counter()
    o_txt, o_y = ours()
    compile_s = time.perf_counter() - t0
    r_txt, r_y = theirs()
    t_ours = timed(ours, args.repeats)
    t_ref = timed(theirs, args.repeats)
    print(f"compile + first run (jaxedit, both encoders): {compile_s:.1f}s")
    print(
        f"encode {args.batch} prompts: jaxedit {1e3 * t_ours:.0f} ms, transformers {1e3 * t_ref:.0f} ms, "
        f"transformers/jaxedit = {t_ref / t_ours:.2f}x (median of {args.repeats})"
    )
    print(f"outputs agree: T5 hidden {rel(o_txt, r_txt.numpy()):.1e}, CLIP pooled {rel(o_y, r_y.numpy()):.1e}")


if __name__ == "__main__":
    main()
