"""The training loop: model folder -> sharded state -> steps -> Orbax checkpoints -> export.

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
(text encoders and VAE from the model folder, `jaxedit.train.encoders`), or read from a cache
written by `python -m train.precompute`; then the global batch is assembled for the sharded step.

Step1X-Edit model folders (family "step1x-edit") train the DiT and its connector: the text
conditioning is Qwen2.5-VL (PyTorch, `jaxedit.step1x.text`) of (instruction, source image),
each item's output cached as .npz in `qwen_cache`, so later epochs never run Qwen; prompt
dropout uses each item's ("", source image), the pipeline's negative prompt. The objective
needs ref_index=0 (reference ids equal the target's), as configs/step1x_*.py set.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxedit import configs, families, model_folder
from jaxedit.checkpoint import load_params
from jaxedit.data import cache, reader, records
from jaxedit.models import attention
from jaxedit.models.flux import REMAT_POLICIES
from jaxedit.parallel import sharding as sh
from jaxedit.parallel.distributed import put_global
from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig, make_iterator, manifest_path
from jaxedit.train.encoders import Encoder
from jaxedit.train.lora import export_peft
from jaxedit.train.monitor import Monitor, SampleEdits
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.step import Trainer


def model_of(cfg: TrainConfig) -> tuple[Path, configs.Preset]:
    """(folder, preset) of the run's model folder, checked complete (no weights read)."""
    if not cfg.model:
        raise ValueError("TrainConfig.model is empty: set model=FOLDER (a jaxedit model folder)")
    folder = Path(cfg.model)
    preset = model_folder.read_description(folder)
    if cfg.init not in ("folder", "random"):
        raise ValueError(f"init {cfg.init!r}: use 'folder' or 'random'")
    # a random init does not read the folder's transformer: a folder without one is fine
    model_folder.check_complete(folder, preset, skip=("transformer",) if cfg.init == "random" else ())
    if quantized := model_folder.read_quantized(folder):
        raise ValueError(f"{folder} stores quantised weights ({quantized}): train from the unquantised "
                         "folder (`jaxedit-convert quantize` makes a quantised copy after)")  # fmt: skip
    return folder, preset


TRAIN_DTYPES = ("bfloat16", "float32", "float16")  # compute dtypes (master weights are float32)


def check_run(cfg: TrainConfig) -> None:
    """Every check a run makes before any work (model folder, settings against it): ValueError or
    FileNotFoundError naming what is wrong (`jaxedit train` prints it in one line)."""
    check_config(cfg, model_of(cfg)[1])
    check_data(cfg.data)


def check_data(data: DataConfig) -> None:
    """data.path: a packed dataset's index and shards (ValueError naming a shard that is not what the index says)
    and its data.cache's index (computed from these shards under these bucket settings), else the manifest
    (FileNotFoundError naming data.path)."""
    if records.is_packed(data.path):
        index = records.read_index(data.path)
        reader.shard_paths(data.path, index, data.copies, data.verify)
        if data.cache:
            cache.check(data.cache, data, index)
    else:
        manifest_path(data)


def data_iterator(data: DataConfig, **kw):
    """(grain iterator, batches) of data.path: a packed dataset (holding index.json) is read from its shards
    (`jaxedit.data.reader`), a folder from its manifest (`jaxedit.train.data`)."""
    return (reader.make_iterator if records.is_packed(data.path) else make_iterator)(data, **kw)


def load_model(cfg: TrainConfig):
    """(folder, preset, transformer params (float32), {vae, t5, clip params}) of the run's model folder;
    init="random" re-initialises the transformer (seeded by cfg.seed) instead of reading it."""
    folder, preset = model_of(cfg)
    parts = {p: load_params(folder / p) for p in ("vae", "t5", "clip") if getattr(preset, p) is not None}
    if cfg.init == "folder":
        transformer = load_params(folder / "transformer", dtype=jnp.float32)
    else:
        model, args = families.of(preset).transformer(preset)
        init = jax.jit(lambda k: model.init(k, *args)["params"])
        transformer = sh.unbox(init(jax.random.key(cfg.seed)))
    return folder, preset, transformer, parts


def train_mesh(cfg: TrainConfig, preset: configs.Preset, devices: list, memory: float | None = None):
    """The run's `MeshConfig`: `cfg.mesh`, or for "auto" `placement.train_rule` with the training state's bytes
    (full fine-tune: float32 parameters, gradients and two Adam moments, 16 B a parameter; LoRA: the frozen
    float32 base, 4 B) and the chips' memory (default: what the first device reports; None on a CPU)."""
    if cfg.mesh != "auto":
        return configs.MeshConfig.parse(cfg.mesh)
    from jaxedit.model_folder import expected_params
    from jaxedit.parallel import placement

    params = sum(math.prod(x.shape) for x in jax.tree.leaves(expected_params(preset, "transformer")))
    memory = placement.chip_memory(devices[0]) if memory is None else memory
    return placement.train_rule(len(devices), params * (4 if cfg.lora is not None else 16), memory)


def check_config(cfg: TrainConfig, preset: configs.Preset) -> None:
    """Refuse settings the run could not honour (instead of ignoring them)."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if "://" in cfg.checkpoint_dir:  # (Path() would turn gs://b/x into a local folder gs:/b/x)
        raise ValueError(f"checkpoint_dir {cfg.checkpoint_dir}: URLs are not supported yet (its metrics, samples "
                         "and exports are written as local files): give a local or mounted folder")  # fmt: skip
    try:
        if cfg.mesh != "auto":
            configs.MeshConfig.parse(cfg.mesh)
    except ValueError as e:
        raise ValueError(f"mesh: {e} (or 'auto')") from None
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"remat {cfg.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    if cfg.dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r}: use one of {', '.join(TRAIN_DTYPES)} (the compute dtype)")
    if cfg.attention not in attention.IMPLEMENTATIONS:
        raise ValueError(f"attention {cfg.attention!r}: use one of {', '.join(attention.IMPLEMENTATIONS)}")
    if cfg.data.batch_size % (cfg.grad_accum * jax.process_count()):
        raise ValueError(f"batch_size {cfg.data.batch_size} not divisible by grad_accum x processes")
    if cfg.objective.guidance != ObjectiveConfig.guidance and not getattr(preset.transformer, "guidance_embed", False):
        raise ValueError(
            f"objective.guidance={cfg.objective.guidance}: {preset.name} has no guidance embedding (leave it at 1.0)"
        )
    families.of(preset).check_train(cfg)  # e.g. Step1X-Edit: no LoRA, no data.cache
    if cfg.data.cache and cfg.vae_sample:
        raise ValueError("vae_sample needs images; data.cache holds posterior means")


class _Stop:
    """SIGTERM -> finish the step, save, exit."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, *_):
        self.requested = True


def _stored(state: dict) -> dict:
    """What a checkpoint holds: the state less a LoRA run's frozen base (the model folder's weights)."""
    return {k: v for k, v in state.items() if k != "base"}


@dataclasses.dataclass
class Run:
    """Everything one training run is built from (`build`)."""

    cfg: TrainConfig
    folder: Path
    preset: configs.Preset
    trainer: Trainer
    data_iter: Any
    batches: Any
    encoder: Encoder | None  # None: batches come from data.cache
    empty: tuple | None  # the empty prompt's (txt, y): prompt dropout of a Kontext run
    manager: ocp.CheckpointManager
    ckpt_dir: Path


def build(cfg: TrainConfig, folder: Path, preset: configs.Preset, parts: dict) -> Run:
    """The trainer, data iterator, encoders and checkpoint manager of a run."""
    mesh = sh.make_mesh(train_mesh(cfg, preset, jax.devices()))
    trainer = Trainer(
        preset.transformer,
        cfg.objective,
        cfg.optim,
        cfg.steps,
        mesh,
        dtype=jnp.dtype(cfg.dtype),
        remat_policy=cfg.remat,
        mlp_chunks=cfg.mlp_chunks,
        scan_layers=cfg.scan_layers,
        attention_impl=cfg.attention,
        lora=cfg.lora,
        **{c: getattr(preset, c) for c in families.of(preset).transformer_configs},  # e.g. Step1X-Edit's connector
    )
    family = families.of(preset)
    # as many sources per item as the family takes (Step1X-Edit: one; its Qwen2.5-VL sees it)
    data_iter, batches = data_iterator(cfg.data, model=folder, max_sources=family.max_references)
    encoder, empty = family.train_encoder(cfg, folder, preset, parts, batches, mesh)
    ckpt_dir = Path(cfg.checkpoint_dir).absolute()
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=cfg.checkpoint_every,
            enable_async_checkpointing=cfg.async_checkpointing,
        ),
    )
    return Run(cfg, folder, preset, trainer, data_iter, batches, encoder, empty, manager, ckpt_dir)


def restore_or_init(run: Run, transformer, key: jax.Array) -> tuple[dict, int]:
    """(state, first step): the last complete checkpoint of the run, else a fresh state."""
    cfg, trainer, lead = run.cfg, run.trainer, jax.process_index() == 0
    latest = run.manager.latest_step()
    if latest is None:
        return trainer.init_state(transformer, jax.random.fold_in(key, 2**31 - 1)), 0  # a stream no step uses
    restored = run.manager.restore(
        latest,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_stored(trainer.abstract_state)),
            data=grain.checkpoint.CheckpointRestore(run.data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    state, start = restored["state"], int(restored["meta"]["step"])
    if cfg.lora is not None:
        state["base"] = put_global(transformer, trainer.param_shardings)
    if restored["meta"]["seed"] != cfg.seed:
        raise ValueError(f"checkpoint seed {restored['meta']['seed']} != config seed {cfg.seed}")
    if lead:  # (the Monitor drops metrics.jsonl's records after `start`)
        print(f"resumed from step {start} ({run.ckpt_dir / str(latest)})", flush=True)
    return state, start


def sample_editor(run: Run) -> SampleEdits | None:
    """Sample edits of the first `sample_count` training items (main process; None when off)."""
    cfg = run.cfg
    if not cfg.sample_every or jax.process_index() != 0:
        return None
    from jaxedit.pipelines.auto import load_pipeline

    kw = families.of(run.preset).sample_options(cfg, run.encoder)  # e.g. the items' own sizes, as trained
    pipe = load_pipeline(run.folder, compile_cache=False, **kw)
    return SampleEdits(pipe, run.batches.sample_items(cfg.sample_count, run.ckpt_dir / "sample_inputs"), run.ckpt_dir)


def run_steps(run: Run, state: dict, start: int, key: jax.Array) -> tuple[dict, dict]:
    """Steps start..cfg.steps (or until SIGTERM), with logging, sample edits and checkpoints."""
    cfg, trainer, manager = run.cfg, run.trainer, run.manager
    stop = _Stop()

    def save(step: int, force: bool = False) -> None:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_stored(state)),
                data=grain.checkpoint.CheckpointSave(run.data_iter),
                meta=ocp.args.JsonSave({"step": step, "seed": cfg.seed}),
            ),
            force=force,
        )

    monitor = Monitor(run.ckpt_dir, cfg.steps, cfg.data.batch_size, start, jax.process_index() == 0, cfg.tensorboard)
    sampler = sample_editor(run)
    a = cfg.grad_accum
    last = {}
    for step in range(start, cfg.steps):
        host = next(run.data_iter)
        if run.encoder is None:
            enc = {k: host[k] for k in trainer.batch_shardings(host)}
        else:
            enc = run.encoder(host, jax.random.fold_in(jax.random.fold_in(key, step), 1 << 20))
        # micro-batch i = items i, i + a, i + 2a, ... of this process's slice, so of the global batch:
        # the same micro-batches (and random draws) whatever the number of processes
        batch = {k: np.swapaxes(v.reshape(v.shape[0] // a, a, *v.shape[1:]), 0, 1) for k, v in enc.items()}
        state, metrics = trainer.step(state, batch, key, run.empty)
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
    return state, last


def export(run: Run, state: dict) -> None:
    """A LoRA run's adapters for diffusers; with export_model, the trained transformer (EMA if kept) into
    the model folder (written beside, then swapped in: the old weights stay until the new ones are complete)."""
    cfg, lead = run.cfg, jax.process_index() == 0
    if cfg.lora is not None and lead:
        export_peft(state["lora"], cfg.lora, run.preset, run.ckpt_dir / "lora.safetensors")
        if "ema" in state:
            export_peft(state["ema"], cfg.lora, run.preset, run.ckpt_dir / "lora_ema.safetensors")
        print(f"LoRA adapters (diffusers/PEFT layout): {run.ckpt_dir / 'lora.safetensors'}", flush=True)
    if cfg.export_model and cfg.lora is None and int(jax.device_get(state["step"])) == cfg.steps:
        model_folder.write_part(run.folder, "transformer", state.get("ema", state["params"]))
        if lead:
            which = "EMA" if "ema" in state else "final"
            print(f"wrote {run.folder / 'transformer'} ({which} parameters)", flush=True)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged step's metrics."""
    folder, preset, transformer, parts = load_model(cfg)
    check_config(cfg, preset)
    run = build(cfg, folder, preset, parts)
    key = jax.random.key(cfg.seed)
    state, start = restore_or_init(run, transformer, key)
    del transformer
    state, last = run_steps(run, state, start, key)
    export(run, state)
    return last
