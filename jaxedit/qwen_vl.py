"""The JAX Qwen2.5-VL as a conditioning encoder: what the families that condition on its last hidden states share.

- `QwenVLEncoder`: the model (`jaxedit.models.qwen2_5_vl`, no torch) run on several items at once, each item's
  tokens and image patches padded to shape buckets (one jitted program per bucket), on one device or a mesh
  (weights sharded by the logical rules, the items split over the batch axes). It takes prepared items (token
  ids, attention mask, the image processor's pixel values and grids) and gives each item's last hidden state.
- A model folder's "qwen" entry (`qwen_entry`, `read_qwen_section`): the converted Qwen2.5-VL's architecture
  in qwen/, its tokenizer / image processor files in qwen_processor/ (`QWEN_PROCESSOR`), the family's
  conditioning config.
- `smart_resize` (the Qwen2-VL image processor's rule), `bucket`, and per-item cache files of embeddings
  (`save_embedding` / `load_embedding`).

Each family's conditioning (prompt rendering, image resizing, which rows to keep) lives in its own package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QWEN_PROCESSOR = "qwen_processor"  # a model folder's Qwen2.5-VL tokenizer / image processor (/ chat template) files


def bucket(n: int, step: int) -> int:
    """n rounded up to a multiple of `step` (shapes in buckets: one compiled program per bucket)."""
    return -(-n // step) * step


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, max_ratio: float = 200
) -> tuple[int, int]:
    """(height, width) as multiples of `factor`, area within [min_pixels, max_pixels], aspect kept
    (qwen_vl_utils / transformers' Qwen2-VL rule)."""
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is above {max_ratio}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# ----------------------------------------------------------------------------------------
# a model folder's "qwen" entry


def qwen_entry(path: str | Path | None, config: Any, model=None) -> dict:
    """The "qwen" entry of a model folder's description (`model_folder.write_description(..., extra=...)`): a
    transformers Qwen2.5-VL folder (absolute, or None), the family's conditioning config (a dataclass) and the
    architecture (a `QwenVLConfig`) of the Qwen2.5-VL converted into the folder's qwen/ (None: none)."""
    entry = {"path": None if path is None else str(path), "config": dataclasses.asdict(config)}
    return {"qwen": entry | ({"model": model.to_dict()} if model is not None else {})}


@dataclasses.dataclass(frozen=True)
class QwenSection:
    """A model folder's "qwen" entry, parsed: a recorded transformers Qwen2.5-VL folder (older folders; None if
    none), the conditioning config and the architecture of the Qwen2.5-VL converted into its qwen/ (a
    `configs.QwenVLConfig`; None: none)."""

    path: Path | None
    config: Any
    model: Any = None


def read_qwen_section(folder, parse_config: Callable[[dict], Any]) -> QwenSection:
    """The "qwen" entry of an opened `ModelFolder`, its "config" read by `parse_config` (the family's config
    type's `from_dict`)."""
    from jaxedit.configs import QwenVLConfig

    q = folder.qwen
    path, model = q.get("path"), QwenVLConfig.from_dict(q["model"]) if q.get("model") else None
    config = parse_config(q.get("config", {}))
    return QwenSection(None if path is None else folder.path / Path(path), config, model)


def config_from_dict(cls: type, d: dict, what: str):
    """A frozen config dataclass from a dict (lists become tuples); ValueError naming unknown fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown {what} config field(s) {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------
# cache files


def save_embedding(path: str | Path, embeddings_LD: np.ndarray, mask_L: np.ndarray) -> Path:
    """One item's (embeddings [L, D], mask [L]) -> `path` (.npz). Stores the kept rows only,
    as bfloat16 bits when that is lossless."""
    import ml_dtypes

    from jaxedit.staged import staged_file

    emb, mask = np.asarray(embeddings_LD, np.float32), np.asarray(mask_L)
    n = int((mask != 0).sum())
    if not (mask[:n] != 0).all() or np.any(emb[n:]):
        raise ValueError("save_embedding takes a prefix mask with zero rows after the kept tokens")
    rows = emb[:n]
    b16 = rows.astype(ml_dtypes.bfloat16)
    lossless = np.array_equal(b16.astype(np.float32), rows)
    data = b16.view(np.uint16) if lossless else rows
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp, open(tmp, "wb") as f:  # (a file object: np.savez adds no .npz)
        np.savez(f, embeddings=data, dtype="bfloat16" if lossless else "float32", max_length=len(mask))
    return path


def load_embedding(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [max_length, D] float32, mask [max_length] int32) from `save_embedding`."""
    import ml_dtypes

    with np.load(path) as f:
        rows, dtype, max_length = f["embeddings"], str(f["dtype"]), int(f["max_length"])
    if dtype == "bfloat16":
        rows = rows.view(ml_dtypes.bfloat16)
    emb = np.zeros((max_length, rows.shape[1]), np.float32)
    emb[: len(rows)] = rows.astype(np.float32)
    mask = np.zeros(max_length, np.int32)
    mask[: len(rows)] = 1
    return emb, mask


# ----------------------------------------------------------------------------------------
# tokenizer and image processor files


def load_tokenizer(path: Path):
    """The Qwen2.5-VL tokenizer of a folder (local files only)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_image_processor(path: Path, **overrides):
    """The Qwen2-VL image processor of a folder's preprocessor_config.json, the PIL backend (no torch; the slow
    processor of transformers 4), `overrides` (e.g. min_pixels, max_pixels) replacing the file's values."""
    import transformers

    processor_cls = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)
    return processor_cls.from_pretrained(path, local_files_only=True, **overrides)


# ----------------------------------------------------------------------------------------
# the model


class QwenVLEncoder:
    """The JAX Qwen2.5-VL on prepared items: `last_hidden_states(items)` -> one [L_i, hidden] float32 array per
    item, items run `batch_size` at a time through one jitted program per (items, tokens, image patches)
    bucket.

    An item is a dict of numpy arrays: input_ids [L] (image pads expanded), attention_mask [L] (optional, default
    all ones: masked tokens are no keys and get position 0, as transformers' rope index), pixel_values [N,
    patch_dim] and image_grid_thw [n_images, 3] (the Qwen2-VL image processor's outputs; the images in the order
    of their pads).

    params: `QwenVL(qwen_cfg)` parameters (a model folder's qwen/: `load`); dtype: compute dtype; mesh: shard
    the weights by the logical rules (FSDP, tensor) and split the items over the batch axes (a batch is padded
    with empty rows to a multiple of them)."""

    TOKEN_BUCKET, UNIT_BUCKET = 64, 64  # text tokens; merged image patches (x4 patches)

    def __init__(
        self, params, qwen_cfg, *, dtype="bfloat16", attention_impl: str = "auto", batch_size: int = 4, mesh=None
    ):
        import jax
        import jax.numpy as jnp

        from jaxedit.models.qwen2_5_vl import QwenVL

        self.params, self.qwen_cfg, self.batch_size = params, qwen_cfg, max(1, int(batch_size))
        self.dtype = jnp.dtype(dtype)
        model = QwenVL(qwen_cfg, dtype=self.dtype, attention_impl=attention_impl)
        self.apply_fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a).astype(jnp.float32))
        self.mesh, self.rows = mesh, 1
        if mesh is not None:
            from jaxedit.models.qwen2_5_vl import abstract_params
            from jaxedit.parallel import sharding as sh

            self.params = jax.device_put(params, sh.shardings(abstract_params(qwen_cfg, boxed=True), mesh))
            self.rows = mesh.shape["data"] * mesh.shape["fsdp"]

    @classmethod
    def load(cls, path: str | Path, qwen_cfg, *, dtype="bfloat16", **kw) -> QwenVLEncoder:
        """The converted Qwen2.5-VL checkpoint at `path` (a model folder's qwen/), on kw["mesh"] straight into
        its sharding when given; kw: the other `QwenVLEncoder` arguments."""
        import jax.numpy as jnp

        from jaxedit.checkpoint import load_params

        target = None
        if kw.get("mesh") is not None:
            from jaxedit.checkpoint import as_stored_on, param_metadata
            from jaxedit.models.qwen2_5_vl import abstract_params
            from jaxedit.parallel import sharding as sh

            where = sh.shardings(abstract_params(qwen_cfg, boxed=True), kw["mesh"])
            target = as_stored_on(param_metadata(path), where)
        params = load_params(Path(path), target, dtype=jnp.dtype(dtype))
        return cls(params, qwen_cfg, dtype=dtype, **kw)

    @property
    def hidden_size(self) -> int:
        return self.qwen_cfg.text.hidden_size

    def batch_arrays(self, prepared: Sequence[dict[str, Any]]) -> tuple[tuple, list[int]]:
        """The model's inputs for several prepared items (padded to the buckets) and their lengths."""
        from jaxedit.models.qwen2_5_vl import prepare_vision, rope_positions

        cfg = self.qwen_cfg
        lens = [len(x["input_ids"]) for x in prepared]
        b, length = bucket(len(prepared), self.rows), bucket(max(lens), self.TOKEN_BUCKET)  # empty rows: no keys
        ids, mask = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
        pos = np.zeros((3, b, length), np.int32)
        for i, x in enumerate(prepared):
            ids[i, : lens[i]] = x["input_ids"]
            mask[i, : lens[i]] = x["attention_mask"] if "attention_mask" in x else 1
            pos[:, i] = rope_positions(ids[i], mask[i], x["image_grid_thw"], cfg)
        grids = np.concatenate([x["image_grid_thw"] for x in prepared])
        units = int(sum(np.prod(g) for g in grids)) // cfg.vision.spatial_merge_size**2
        vision = prepare_vision(
            np.concatenate([x["pixel_values"] for x in prepared]), grids, cfg.vision,
            pad_to=bucket(units, self.UNIT_BUCKET) if units else 1,
        )  # fmt: skip
        pads = ids == cfg.image_token_id
        if int(pads.sum()) != units:
            raise ValueError(f"{int(pads.sum())} image-pad tokens for {units} image features")
        feature_index = np.full((b, length), -1, np.int32)
        feature_index[pads] = vision.pop("inverse")
        return (ids, pos, mask, vision, feature_index), lens

    def run(self, arrays) -> np.ndarray:
        """The jitted model on `batch_arrays`' output: last hidden states [B, L, hidden] float32. On a mesh the
        prompts' rows are split over the batch axes (positions [3, B, L]: its second axis), the packed
        images replicated."""
        if self.mesh is None:
            return np.asarray(self.apply_fn(self.params, *arrays))
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxedit.parallel import sharding as sh

        ids, pos, mask, vision, index = arrays
        batch = sh.batch_sharding(self.mesh, 2)
        by_row = NamedSharding(self.mesh, PartitionSpec(None, *batch.spec))
        ids, mask, index = (jax.device_put(x, batch) for x in (ids, mask, index))
        with sh.activate(self.mesh):
            return np.asarray(self.apply_fn(self.params, ids, jax.device_put(pos, by_row), mask, vision, index))

    def last_hidden_states(self, prepared: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Each prepared item's last hidden state [L_i, hidden] float32 (`batch_size` items per run)."""
        out = []
        for start in range(0, len(prepared), self.batch_size):
            arrays, lens = self.batch_arrays(prepared[start : start + self.batch_size])
            hidden = self.run(arrays)
            out += [hidden[i, :n] for i, n in enumerate(lens)]
        return out
