"""The training loop: model folder -> sharded state -> steps -> Orbax checkpoints.

    python -m train --config configs/kontext_tiny.py --set data.path=/data/pairs --set checkpoint_dir=/ckpt

A checkpoint (Orbax CheckpointManager, async, every `checkpoint_every` steps, last
`keep` kept) holds the train state (params, optimizer state, EMA, step), the grain
iterator of every process and a JSON record (seed, step). A LoRA run (`lora`) trains adapters
only: its checkpoints hold the adapters and their optimizer state and EMA, not the frozen base
(re-read from the model folder on restart), and it ends by writing the adapters for diffusers
as <checkpoint_dir>/lora.safetensors (jaxedit.train.lora.export_peft). Orbax writes into a temporary
directory and renames it when complete, so a checkpoint being written when the process
dies is never restored; restarting the same command continues from the last complete
one with the same data order and the same random draws (step s uses fold_in(key, s)).
SIGTERM finishes the current step, saves and exits.

Text embeddings and VAE latents are computed inline on each process's local devices
(text encoders and VAE from the model folder), then the global batch is assembled for
the sharded train step.

Step1X-Edit model folders (family "step1x-edit") train the DiT and its connector: the text
conditioning is Qwen2.5-VL (PyTorch, `jaxedit.step1x_text`) of (instruction, source image),
each item's output cached as .npz in `qwen_cache`, so later epochs never run Qwen; prompt
dropout uses each item's ("", source image), the pipeline's negative prompt. The objective
needs ref_index=0 (reference ids equal the target's), as configs/step1x_*.py set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxedit import configs, model_folder
from jaxedit import sharding as sh
from jaxedit.distributed import put_global
from jaxedit.models.autoencoder import AutoEncoder
from jaxedit.train.data import DataConfig, make_iterator
from jaxedit.train.lora import LoraConfig, export_peft
from jaxedit.train.monitor import Monitor, SampleEdits
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig
from jaxedit.train.step import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "models/default"  # jaxedit model folder (transformer, vae, t5, clip, tokenizers)
    init: str = "folder"  # folder: start from the folder's transformer; random: re-initialise it
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per step (data.batch_size is split into them)
    mesh: str = "fsdp=-1"  # jaxedit.configs.MeshConfig.parse spec
    dtype: str = "bfloat16"  # compute dtype (master weights are float32)
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = True
    attention: str = "auto"
    seed: int = 0
    vae_sample: bool = False  # encode with a sample of the VAE posterior (default: its mean, as BFL)
    checkpoint_dir: str = "checkpoints/run"
    checkpoint_every: int = 100
    keep: int = 3
    log_every: int = 1
    async_checkpointing: bool = True
    lora: LoraConfig | None = None  # train LoRA adapters only; written as <checkpoint_dir>/lora.safetensors
    export_model: bool = False  # at the end, write the trained transformer (EMA if kept) into the model folder
    qwen: str = ""  # Step1X-Edit: Qwen2.5-VL folder ("": the one the model folder records)
    qwen_cache: str = ""  # Step1X-Edit: folder of per-item Qwen outputs ("": <checkpoint_dir>/qwen_cache)
    sample_every: int = 0  # every N steps, edit `sample_count` training items with the current (EMA) weights
    sample_count: int = 4  # ... written as <checkpoint_dir>/samples/step_N.png (FLUX.1 Kontext family)
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboardX is installed


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply `a.b=value` assignments (value parsed as JSON, Python's True/False/None accepted, else
    kept as a string). A boolean field only takes a boolean: `--set x=False` must not become truthy."""
    for a in assignments:
        key, _, raw = a.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw)
        cfg = _replace(cfg, key.split("."), value, a)
    return cfg


def _replace(obj, keys, value, where):
    names = {f.name for f in dataclasses.fields(obj)}
    if keys[0] not in names:
        raise KeyError(f"--set {where}: {type(obj).__name__} has no field {keys[0]!r} (fields: {sorted(names)})")
    if len(keys) > 1:
        value = _replace(getattr(obj, keys[0]), keys[1:], value, where)
    elif isinstance(value, list):
        value = tuple(value)
    elif isinstance(getattr(obj, keys[0]), bool) and not isinstance(value, bool):
        raise ValueError(f"--set {where}: {keys[0]} is a boolean (true or false), got {value!r}")
    return dataclasses.replace(obj, **{keys[0]: value})


def load_config(path: str | Path, assignments: list[str] = ()) -> TrainConfig:
    """Run a Python config file exposing `get_config() -> TrainConfig`, then apply overrides."""
    ns: dict[str, Any] = {"__file__": str(path), "__name__": "train_config"}
    exec(compile(Path(path).read_text(), str(path), "exec"), ns)  # noqa: S102 - configs are code
    if "get_config" not in ns:
        raise ValueError(f"{path}: a config file must define get_config()")
    return override(ns["get_config"](), list(assignments))


class Encoder:
    """Text encoders + VAE of a model folder on this process's local devices (host-local)."""

    def __init__(self, folder: Path, preset: configs.Preset, params: dict, vae_sample: bool):
        from jaxedit.text import FluxTextEncoder, load_tokenizer

        tok = model_folder.TOKENIZERS
        self.text = FluxTextEncoder(
            preset.t5,
            preset.clip,
            params["t5"],
            params["clip"],
            load_tokenizer(folder / tok["t5"]),
            load_tokenizer(folder / tok["clip"]),
        )
        self._init_vae(preset, params, vae_sample)

    def _init_vae(self, preset: configs.Preset, params: dict, vae_sample: bool) -> None:
        vae = AutoEncoder(preset.vae)
        self.vae_params, self.vae_sample = params["vae"], vae_sample
        self._encode = jax.jit(lambda p, x, k: vae.apply({"params": p}, x, k, method="encode"))

    def latents(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """VAE latents of the host batch's source (reference) and target images [b, H, W, 3]."""
        ks, kt = jax.random.split(key) if self.vae_sample else (None, None)
        return {
            "reference": np.asarray(self._encode(self.vae_params, batch["source"], ks)),
            "target": np.asarray(self._encode(self.vae_params, batch["target"], kt)),
        }

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """Host batch (images [b, H, W, 3], instructions) -> latents and text embeddings (numpy)."""
        txt, y = self.text.encode(list(batch["instruction"]))
        return self.latents(batch, key) | {"txt": np.asarray(txt, np.float32), "y": np.asarray(y, np.float32)}


class Step1XEncoder(Encoder):
    """Step1X-Edit: Qwen2.5-VL of (instruction, source image) + VAE. Each item's Qwen output is cached
    in `cache_dir`; with `empties` each item's ("", source image) too (prompt dropout)."""

    def __init__(
        self,
        folder: Path,
        preset: configs.Preset,
        params: dict,
        vae_sample: bool,
        *,
        qwen: str = "",
        cache_dir: str | Path | None = None,
        empties: bool = False,
    ):
        from jaxedit.step1x_text import Step1XQwenEmbedder

        recorded, qcfg = model_folder.read_qwen(folder)
        path = Path(qwen) if qwen else recorded
        if path is None:
            raise FileNotFoundError(f"{folder}/jaxedit.json records no Qwen2.5-VL folder: set qwen=PATH")
        if qcfg.hidden_size != preset.connector.in_channels:
            raise ValueError(f"Qwen hidden size {qcfg.hidden_size} != connector in_channels")
        self.text = Step1XQwenEmbedder.from_pretrained(path, qcfg)
        self.cache_dir, self.empties = cache_dir, empties
        self._init_vae(preset, params, vae_sample)

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """-> latents, txt [b, L, D_qwen], txt_mask [b, L] (and empty_txt, empty_mask)."""
        from PIL import Image

        pixels = np.clip(np.round((np.asarray(batch["source"]) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        images = [Image.fromarray(x) for x in pixels]
        txt, mask = self.text.encode(list(batch["instruction"]), images, cache_dir=self.cache_dir)
        out = self.latents(batch, key) | {"txt": txt, "txt_mask": mask}
        if self.empties:
            txt, mask = self.text.encode([""] * len(images), images, cache_dir=self.cache_dir)
            out |= {"empty_txt": txt, "empty_mask": mask}
        return out


def _load_model(cfg: TrainConfig):
    folder = Path(cfg.model)
    preset = model_folder.read_description(folder)
    # a random init does not read the folder's transformer: a folder without one is fine
    model_folder.check_complete(folder, preset, skip=("transformer",) if cfg.init == "random" else ())
    from jaxedit.checkpoint import load_params

    parts = {p: load_params(folder / p) for p in ("vae", "t5", "clip") if getattr(preset, p) is not None}
    if cfg.init == "folder":
        transformer = load_params(folder / "transformer", dtype=jnp.float32)
    elif cfg.init == "random":
        from jaxedit.models.flux import Flux
        from jaxedit.models.step1x import Step1XEdit

        tcfg = preset.transformer
        args = [jnp.zeros((1, 1, tcfg.in_channels)), jnp.zeros((1, 1, 3))]
        if preset.connector is None:
            args += [jnp.zeros((1, 1, tcfg.context_in_dim)), jnp.zeros((1, 1, 3)), jnp.zeros((1,))]
            args += [jnp.zeros((1, tcfg.vec_in_dim)), jnp.zeros((1,)) if tcfg.guidance_embed else None]
            model = Flux(tcfg)
        else:  # Step1X-Edit: Qwen states and mask, t
            args += [jnp.zeros((1, 1, preset.connector.in_channels)), jnp.ones((1, 1), jnp.int32), jnp.zeros((1,))]
            model = Step1XEdit(tcfg, connector_cfg=preset.connector)
        init = jax.jit(lambda k: model.init(k, *args)["params"])
        transformer = sh.unbox(init(jax.random.key(cfg.seed)))
    else:
        raise ValueError(f"init {cfg.init!r}: use 'folder' or 'random'")
    return folder, preset, transformer, parts


class _Stop:
    """SIGTERM -> finish the step, save, exit."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, *_):
        self.requested = True


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (a restarted run re-logs the steps after its checkpoint)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def _stored(state: dict) -> dict:
    """What a checkpoint holds: the state less a LoRA run's frozen base (the model folder's weights)."""
    return {k: v for k, v in state.items() if k != "base"}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's metrics."""
    stop = _Stop()
    lead = jax.process_index() == 0
    folder, preset, transformer, parts = _load_model(cfg)
    if cfg.data.batch_size % (cfg.grad_accum * jax.process_count()):
        raise ValueError(f"batch_size {cfg.data.batch_size} not divisible by grad_accum x processes")
    step1x = preset.connector is not None
    if step1x and cfg.lora is not None:
        raise ValueError("LoRA training exports diffusers' FLUX.1 Kontext layout: train Step1X-Edit fully")
    if step1x and cfg.data.cache:
        raise ValueError("data.cache holds T5/CLIP embeddings; Step1X-Edit caches its Qwen outputs in qwen_cache")
    mesh = sh.make_mesh(configs.MeshConfig.parse(cfg.mesh))
    trainer = Trainer(
        preset.transformer,
        cfg.objective,
        cfg.optim,
        cfg.steps,
        mesh,
        dtype=jnp.dtype(cfg.dtype),
        remat_policy=cfg.remat,
        scan_layers=cfg.scan_layers,
        attention_impl=cfg.attention,
        lora=cfg.lora,
        connector=preset.connector,
    )
    data_iter, batches = make_iterator(cfg.data)
    empty, encoder = None, None
    if step1x:  # prompt dropout: each item's ("", image), computed (and cached) by the encoder
        qwen_cache = cfg.qwen_cache or Path(cfg.checkpoint_dir) / "qwen_cache"
        encoder = Step1XEncoder(
            folder, preset, parts, cfg.vae_sample, qwen=cfg.qwen, cache_dir=qwen_cache,
            empties=cfg.objective.prompt_dropout > 0,
        )  # fmt: skip
    elif batches.cache is not None:  # latents and text embeddings precomputed: no encoder on this host
        if cfg.vae_sample:
            raise ValueError("vae_sample needs images; data.cache holds posterior means")
        if cfg.objective.prompt_dropout > 0:
            empty = tuple(jnp.asarray(a, jnp.float32) for a in batches.cache.empty)
    else:
        encoder = Encoder(folder, preset, parts, cfg.vae_sample)
        if cfg.objective.prompt_dropout > 0:
            txt, y = encoder.text.encode([""])
            empty = (jnp.asarray(txt[0], jnp.float32), jnp.asarray(y[0], jnp.float32))
    key = jax.random.key(cfg.seed)

    ckpt_dir = Path(cfg.checkpoint_dir).absolute()
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=cfg.checkpoint_every,
            enable_async_checkpointing=cfg.async_checkpointing,
        ),
    )
    metrics_path = ckpt_dir / "metrics.jsonl"
    latest = manager.latest_step()
    if latest is None:
        state = trainer.init_state(transformer, jax.random.fold_in(key, 2**31 - 1))  # a stream no step uses
        start = 0
    else:
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_stored(trainer.abstract_state)),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state, start = restored["state"], int(restored["meta"]["step"])
        if cfg.lora is not None:
            state["base"] = put_global(transformer, trainer.param_shardings)
        if restored["meta"]["seed"] != cfg.seed:
            raise ValueError(f"checkpoint seed {restored['meta']['seed']} != config seed {cfg.seed}")
        if lead:
            _truncate_metrics(metrics_path, start)
            print(f"resumed from step {start} ({ckpt_dir / str(latest)})", flush=True)
    del transformer

    def save(step: int, force: bool = False) -> None:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_stored(state)),
                data=grain.checkpoint.CheckpointSave(data_iter),
                meta=ocp.args.JsonSave({"step": step, "seed": cfg.seed}),
            ),
            force=force,
        )

    monitor = Monitor(ckpt_dir, cfg.steps, cfg.data.batch_size, start, lead, tb=cfg.tensorboard)
    sampler = None
    if cfg.sample_every and lead and not step1x:
        sampler = SampleEdits(folder, batches.index.items[: cfg.sample_count], ckpt_dir)
    a = cfg.grad_accum
    last, metrics = {}, {}
    for step in range(start, cfg.steps):
        host = next(data_iter)
        if encoder is None:
            enc = {k: host[k] for k in trainer.batch_keys}
        else:
            enc = encoder(host, jax.random.fold_in(jax.random.fold_in(key, step), 1 << 20))
        # micro-batch i = items i, i + a, i + 2a, ... of this process's slice, so of the global batch:
        # the same micro-batches (and random draws) whatever the number of processes
        batch = {k: np.swapaxes(v.reshape(v.shape[0] // a, a, *v.shape[1:]), 0, 1) for k, v in enc.items()}
        state, metrics = trainer.step(state, batch, key, empty)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = monitor.log(done, metrics, {"n_bad": int(host["n_bad"])})
        if sampler is not None and (done % cfg.sample_every == 0 or done == cfg.steps):
            sampler(done, trainer.model_params(state, ema="ema" in state))
        if stop.requested:
            save(done, force=True)
            manager.wait_until_finished()
            print(f"SIGTERM: saved step {done}", flush=True)
            break
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done, force=done == cfg.steps)
    manager.wait_until_finished()
    manager.close()
    monitor.close()
    if cfg.lora is not None and lead:
        export_peft(state["lora"], cfg.lora, preset.transformer, ckpt_dir / "lora.safetensors")
        if "ema" in state:
            export_peft(state["ema"], cfg.lora, preset.transformer, ckpt_dir / "lora_ema.safetensors")
        print(f"LoRA adapters (diffusers/PEFT layout): {ckpt_dir / 'lora.safetensors'}", flush=True)
    if cfg.export_model and cfg.lora is None and int(jax.device_get(state["step"])) == cfg.steps:
        from jaxedit.checkpoint import save_params

        save_params(folder / "transformer", state.get("ema", state["params"]), force=True)
        if lead:
            print(f"wrote {folder / 'transformer'} ({'EMA' if 'ema' in state else 'final'} parameters)", flush=True)
    return last


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m train", description="Train a FLUX.1 Kontext-style editing model (or its VAE)."
    )
    p.add_argument("--config", required=True, help="Python config file defining get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.path=/d")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from jaxedit.distributed import initialize_from_env

    initialize_from_env()
    cfg = load_config(args.config, args.set)
    from jaxedit.train.vae import VAETrainConfig, train_vae

    train_vae(cfg) if isinstance(cfg, VAETrainConfig) else train(cfg)
    return 0
