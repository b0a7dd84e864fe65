"""Qwen2.5-VL benchmark: jaxedit's JAX model versus transformers' PyTorch one on Step1X-Edit's workload.

A batch of (prompt, image) pairs (--items; prompts of ~300 tokens around one image each, images of
different sizes) through the vision tower and the language model, medium random config, float32, the
same weights (saved by transformers, read by our converter), one run, timings interleaved (ours, theirs,
ours, ...: a loaded machine slows both alike). jaxedit runs the items as one padded batch (one jitted
program); transformers runs them as Step1X's conditioner does, one at a time, and also as one padded
batch. Prints the medians, the ratios and the agreement of the last hidden states.

    python benchmarks/qwen.py [--items 4] [--width 512] [--layers 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import rel  # benchmarks/common.py (also puts the checkout on sys.path)

from jaxedit.configs import QwenTextConfig, QwenVisionConfig, QwenVLConfig
from jaxedit.models import qwen2_5_vl as Q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--width", type=int, default=512, help="language model width (heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="language model layers and vision blocks")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch
    import transformers

    from checkpoints_convert import load_part

    w, n = args.width, args.layers
    cfg = QwenVLConfig(
        QwenVisionConfig(depth=n, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=w,
                         fullatt_block_indexes=(n - 1,)),
        QwenTextConfig(vocab_size=1000, hidden_size=w, intermediate_size=2 * w, num_layers=n, num_heads=w // 64,
                       num_kv_heads=max(1, w // 256), mrope_section=(8, 12, 12)),
        image_token_id=997, vision_start_token_id=998, vision_end_token_id=999,
    )  # fmt: skip
    hf = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=n,
                         num_attention_heads=w // 64, num_key_value_heads=max(1, w // 256),
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        vision_config=dict(depth=n, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=w,
                           fullatt_block_indexes=[n - 1], window_size=112),
        image_token_id=997, video_token_id=996, vision_start_token_id=998, vision_end_token_id=999,
    )  # fmt: skip
    ref = transformers.Qwen2_5_VLForConditionalGeneration(hf).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        cfg = QwenVLConfig.from_hf(json.loads((Path(d) / "config.json").read_text()))  # as saved (eps 1e-5)
        params = load_part("qwen", d, cfg, dtype=jnp.float32)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); transformers {transformers.__version__}"
    )

    rng = np.random.default_rng(0)
    sizes = [(16, 16), (12, 20), (20, 12), (16, 12)]  # patch grids (merged: /4)
    grids = np.asarray([[1, *sizes[i % len(sizes)]] for i in range(args.items)])
    items = []
    for g in grids:
        units = int(g.prod()) // 4
        ids = np.concatenate([rng.integers(1, 990, 230), [998], np.full(units, 997), [999], rng.integers(1, 990, 40)])
        pixels = rng.standard_normal((int(g.prod()), cfg.vision.patch_dim)).astype(np.float32)
        items.append((ids.astype(np.int64), pixels, g[None]))
    tokens = [len(x[0]) for x in items]
    patches = ", ".join(str(int(g.prod())) for g in grids)
    print(f"config: LM width {w}, {n} layers, {w // 64} heads; vision 256 wide, {n} blocks; float32; "
          f"{args.items} items of {min(tokens)}-{max(tokens)} tokens, images of {patches} patches")  # fmt: skip

    # ours: one padded batch
    length = -(-max(tokens) // 64) * 64
    b = len(items)
    ids, mask, pos = (
        np.zeros((b, length), np.int32),
        np.zeros((b, length), np.int32),
        np.zeros((3, b, length), np.int32),
    )
    for i, (x, _, g) in enumerate(items):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
        pos[:, i] = Q.rope_positions(ids[i], mask[i], g, cfg)
    vision = Q.prepare_vision(np.concatenate([x[1] for x in items]), grids, cfg.vision, pad_to=64)
    index = np.full((b, length), -1, np.int32)
    index[ids == cfg.image_token_id] = vision.pop("inverse")
    model = Q.QwenVL(cfg)
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    arrays = (ids, pos, mask, {k: jnp.asarray(v) for k, v in vision.items()}, index)

    def ours():
        return fn(params, *arrays).block_until_ready()

    def theirs_one_by_one():
        out = []
        with torch.no_grad():
            for x, px, g in items:
                t = torch.from_numpy(x)[None]
                o = ref.model(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=torch.from_numpy(px),
                              image_grid_thw=torch.from_numpy(g), mm_token_type_ids=(t == 997).int())  # fmt: skip
                out.append(o.last_hidden_state[0].numpy())
        return out

    tids = torch.from_numpy(ids.astype(np.int64))

    def theirs_batched():
        with torch.no_grad():
            return ref.model(
                input_ids=tids, attention_mask=torch.from_numpy(mask).long(),
                pixel_values=torch.from_numpy(np.concatenate([x[1] for x in items])),
                image_grid_thw=torch.from_numpy(grids), mm_token_type_ids=(tids == 997).int(),
            ).last_hidden_state.numpy()  # fmt: skip

    t0 = time.perf_counter()
    got = np.asarray(ours())
    compile_s = time.perf_counter() - t0
    want = theirs_one_by_one()
    batched = theirs_batched()
    times = {"ours": [], "one": [], "batched": []}
    for _ in range(args.repeats):  # interleaved
        for name, f in (("ours", ours), ("one", theirs_one_by_one), ("batched", theirs_batched)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"compile + first run (jaxedit): {compile_s:.1f}s")
    print(
        f"{args.items} items: jaxedit (one batch) {1e3 * med['ours']:.0f} ms; transformers one by one "
        f"{1e3 * med['one']:.0f} ms ({med['one'] / med['ours']:.2f}x jaxedit's time), batched "
        f"{1e3 * med['batched']:.0f} ms ({med['batched'] / med['ours']:.2f}x); median of {args.repeats}, interleaved"
    )
    errs = [rel(got[i, : len(x[0])], want[i]) for i, x in enumerate(items)]
    errs_b = [rel(batched[i, : len(x[0])], want[i]) for i, x in enumerate(items)]
    print(f"last hidden states vs transformers one by one: jaxedit max {max(errs):.1e}; "
          f"transformers batched max {max(errs_b):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
