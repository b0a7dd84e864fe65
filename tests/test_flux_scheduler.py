"""`--scheduler` for FLUX.1 Kontext and Step1X-Edit (few-step LoRAs' schedules, issue #40 item 2): FLUX.1's schedule
with the resolution-dependent shift on (its base_shift / max_shift) or off equals diffusers'
FlowMatchEulerDiscreteScheduler as FluxKontextPipeline sets it (use_dynamic_shifting on; off with shift 1); the
flag and the folder option "scheduler" (a named scheduler, KEY=VALUE items or an object of fields) reach the
pipeline; a bad item is one line naming the flag or jaxedit.json's key; the schedule joins the batch result key."""

from __future__ import annotations

import argparse
import json
import types

import numpy as np
import pytest

from jaxedit import presets, sampling
from jaxedit.cli import load_pipeline, model_identity, model_options
from jaxedit.configs import FLUX_SCHEDULERS, FluxSchedulerConfig
from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.model_folder import write_description

# FLUX.1-Kontext-dev's scheduler/scheduler_config.json (shift 3.0 is unused with use_dynamic_shifting)
KONTEXT = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
           "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip


def theirs(steps: int, seq_len: int, cfg: FluxSchedulerConfig):
    """diffusers' sigmas and timesteps / 1000 of FluxKontextPipeline's set_timesteps call with `cfg`."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    fields = dict(base_shift=cfg.base_shift, max_shift=cfg.max_shift, base_image_seq_len=cfg.base_image_seq_len,
                  max_image_seq_len=cfg.max_image_seq_len)  # fmt: skip
    fields |= dict(use_dynamic_shifting=cfg.shift, shift=3.0 if cfg.shift else 1.0)  # off: linear sigmas
    s = diffusers.FlowMatchEulerDiscreteScheduler(**(KONTEXT | fields))
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu if cfg.shift else None)
    return s.sigmas.numpy(), (s.timesteps / 1000).numpy()


@pytest.mark.parametrize("text", ["default", "shift=off", "base_shift=0.3,max_shift=1.5", "linear"])
@pytest.mark.parametrize("steps,seq_len", [(4, 1024), (8, 4096), (8, 1200), (28, 4096)])
def test_schedule_matches_the_scheduler(text, steps, seq_len):
    """Shift off: bit-equal; shift on: within one float32 ulp (jaxedit shifts in float64, diffusers in float32)."""
    cfg = FluxSchedulerConfig.parse(text)
    ours = KontextPipeline.schedule(types.SimpleNamespace(scheduler=cfg), steps, seq_len)
    sigmas, timesteps = theirs(steps, seq_len, cfg)
    atol = 6e-8 if cfg.shift else 0
    np.testing.assert_allclose(ours, sigmas, rtol=0, atol=atol)
    np.testing.assert_allclose(ours[:-1], timesteps, rtol=0, atol=atol)  # the model's timestep is the sigma
    if cfg == FluxSchedulerConfig():
        np.testing.assert_array_equal(ours, sampling.flux_schedule(steps, seq_len))  # the default is unchanged
    if not cfg.shift:
        np.testing.assert_array_equal(ours, np.linspace(1, 0, steps + 1, dtype=np.float32))


@pytest.mark.parametrize("text,message", [
    ("lightning", "'lightning': name one of default, linear"),
    ("shift=3", "shift is a boolean"),
    ("base_shift=abc", "base_shift is a number, got 'abc'"),
    ("shift_terminal=0.02", "'shift_terminal' is not a field"),
    ("max_image_seq_len=100", "max_image_seq_len 100 must be over"),
])  # fmt: skip
def test_a_bad_item_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        FluxSchedulerConfig.parse(text)


def args_of(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    model_options(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("preset", ["flux-kontext-tiny", "step1x-edit-tiny"])
def test_the_flag_reaches_the_pipeline(preset, tmp_path, monkeypatch, capsys):
    from jaxedit import families

    write_description(tmp_path, presets.get(preset), {"scheduler": "base_shift=0.4"})
    cls = families.of(presets.get(preset)).pipeline()

    def load(opened, **kw):  # a stand-in pipeline: the folder's scheduler, as the real load sets it
        pipe = types.SimpleNamespace(scheduler_type=FluxSchedulerConfig, true_cfg_scale=1.0, negative_prompt="")
        pipe.scheduler = FluxSchedulerConfig.from_option(opened.options["scheduler"])
        pipe.set_true_cfg = lambda *a: None
        return pipe

    monkeypatch.setattr(cls, "load", load)
    assert load_pipeline(args_of("--model", str(tmp_path))).scheduler == FluxSchedulerConfig(base_shift=0.4)
    pipe = load_pipeline(args_of("--model", str(tmp_path), "--scheduler", "shift=off"))
    assert pipe.scheduler == FluxSchedulerConfig(shift=False, base_shift=0.4)  # a field over the folder's
    pipe = load_pipeline(args_of("--model", str(tmp_path), "--scheduler", "default"))
    assert pipe.scheduler == FLUX_SCHEDULERS["default"]
    with pytest.raises(SystemExit):  # before anything loads: one line naming the flag
        load_pipeline(args_of("--model", str(tmp_path), "--scheduler", "lightning"))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--scheduler: scheduler 'lightning': name one of default, linear" in err


def test_the_folder_option_and_the_batch_key(tmp_path):
    from jaxedit.random_model import make_random_model

    folder = make_random_model(tmp_path / "m", "flux-kontext-tiny", options={"scheduler": "linear"})
    pipe = KontextPipeline.load(folder, compile_cache=False)
    assert pipe.scheduler == FluxSchedulerConfig(shift=False)
    np.testing.assert_array_equal(pipe.schedule(4, 4096), [1, 0.75, 0.5, 0.25, 0])
    assert KontextPipeline(pipe.preset, pipe.params, None, scheduler={"max_shift": 2.0}).scheduler.max_shift == 2.0
    # a bad folder option: one line naming jaxedit.json's key (the family's own check: Qwen's names are not FLUX's)
    description = json.loads((folder / "jaxedit.json").read_text())
    description["pipeline"]["scheduler"] = "lightning"
    (folder / "jaxedit.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"jaxedit.json: pipeline.scheduler: scheduler 'lightning': name one of"):
        KontextPipeline.load(folder, compile_cache=False)
    # the batch result key: the flag's schedule joins it
    args = argparse.Namespace(model=str(folder), qwen=None, dtype=None, keep_size=False, size_level=None)
    flagged = argparse.Namespace(**{**vars(args), "scheduler": "shift=off"})
    assert model_identity(flagged, pipe) != model_identity(args, pipe)
    assert '"shift": false' in model_identity(flagged, pipe)
