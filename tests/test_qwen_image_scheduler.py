"""`--scheduler` (few-step LoRAs' sampling schedules, issue #40): the "lightning" scheduler equals diffusers'
FlowMatchEulerDiscreteScheduler with Qwen-Image-Lightning's scheduler_config at 4 and 8 steps; the flag reaches a
Qwen-Image-Edit pipeline over its folder's scheduler; a bad item is one line (FLUX.1 Kontext's and Step1X-Edit's
own --scheduler: tests/test_flux_scheduler.py)."""

from __future__ import annotations

import argparse
import math
import types

import numpy as np
import pytest

from jaxedit import presets
from jaxedit.cli import load_pipeline, model_options
from jaxedit.configs import SCHEDULERS, SchedulerConfig
from jaxedit.model_folder import write_description
from jaxedit.qwen_image import sampling as qs
from jaxedit.qwen_image.pipeline import QwenImageEditPipeline

# lightx2v/Qwen-Image-Lightning's model card: the scheduler its 4- / 8-step LoRAs are sampled with
LIGHTNING = {"base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
             "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
             "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
             "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}  # fmt: skip


@pytest.mark.parametrize("steps,seq_len", [(4, 4096), (8, 4096), (8, 1200)])
def test_lightning_schedule_matches_the_scheduler(steps, seq_len):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.FlowMatchEulerDiscreteScheduler(**LIGHTNING)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(3))  # mu: ln 3 at every size
    times = qs.schedule(steps, seq_len, SchedulerConfig.parse("lightning"))
    np.testing.assert_array_equal(times[0], s.sigmas.numpy())
    np.testing.assert_array_equal(times[1, :-1], (s.timesteps / 1000).numpy())
    # the same config spelled field by field, over another base
    spelled = "base_shift=ln(3),max_shift=ln(3),shift_terminal=none"
    assert SchedulerConfig.parse(spelled, SchedulerConfig(max_shift=0.8)) == SCHEDULERS["lightning"]


@pytest.mark.parametrize("text,message", [
    ("lightening", "'lightening': name one of default, lightning"),
    ("foo=1", "'foo' is not a field"),
    ("base_shift=abc", "base_shift is a number, got 'abc'"),
    ("time_shift_type=quad", "time_shift_type 'quad'"),
    ("shift_terminal=1.5", "shift_terminal 1.5 is outside"),
    ("lightning,use_dynamic_shifting=2", "use_dynamic_shifting is a boolean"),
])  # fmt: skip
def test_a_bad_item_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.parse(text)


def args_of(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    model_options(p)
    return p.parse_args(list(argv))


def test_the_flag_reaches_the_pipeline(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "qwen"
    folder.mkdir()
    write_description(
        folder, presets.get("qwen-image-edit-tiny"), {"scheduler": SchedulerConfig(max_shift=0.8).to_dict()}
    )
    calls = []

    def load(opened, **kw):  # a stand-in pipeline: the folder's scheduler, as the real load sets it
        calls.append(kw)
        return types.SimpleNamespace(scheduler=SchedulerConfig.from_dict(opened.options["scheduler"]),
                                     scheduler_type=SchedulerConfig, true_cfg_scale=4.0, negative_prompt=" ",
                                     loras=[])  # fmt: skip

    monkeypatch.setattr(QwenImageEditPipeline, "load", load)
    pipe = load_pipeline(args_of("--model", str(folder)))
    assert pipe.scheduler == SchedulerConfig(max_shift=0.8)  # without the flag: the folder's
    pipe = load_pipeline(args_of("--model", str(folder), "--scheduler", "lightning"))
    assert pipe.scheduler == SCHEDULERS["lightning"]
    np.testing.assert_array_equal(QwenImageEditPipeline.schedule(pipe, 8, 4096),
                                  qs.schedule(8, 4096, SCHEDULERS["lightning"]))  # fmt: skip
    pipe = load_pipeline(args_of("--model", str(folder), "--scheduler", "shift_terminal=none"))
    assert pipe.scheduler == SchedulerConfig(max_shift=0.8, shift_terminal=None)  # a field over the folder's
    assert all("scheduler" not in kw for kw in calls)

    # a bad value: one line naming the flag and the field, before anything loads
    n = len(calls)
    with pytest.raises(SystemExit):
        load_pipeline(args_of("--model", str(folder), "--scheduler", "lightning,max_shift=big"))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--scheduler: max_shift is a number, got 'big'" in err and len(calls) == n


def test_the_folder_option_takes_the_flags_text():
    """The folder option "scheduler": an object of scheduler_config.json's fields or the text of --scheduler (a
    named scheduler and/or KEY=VALUE items), checked when the folder opens (and as the family's type at load)."""
    from jaxedit.options import check_option

    assert SchedulerConfig.from_option("lightning") == SCHEDULERS["lightning"]
    assert SchedulerConfig.from_option("lightning,shift_terminal=0.02").shift_terminal == 0.02
    assert SchedulerConfig.from_option({"max_shift": 0.8}) == SchedulerConfig(max_shift=0.8)
    assert check_option("scheduler", "lightning", "scheduler") == "lightning"
    with pytest.raises(ValueError, match="scheduler 'lightening'"):
        check_option("scheduler", "lightening", "scheduler")
