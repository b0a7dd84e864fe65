"""`python -m train --set a.b=value` overrides of the checked-in configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxedit import presets
from jaxedit.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_parse_json_and_python_literals():
    cfg = load_config(
        CONFIGS / "shapes_dit.py",
        [
            "steps=7",
            "optim.lr=0.002",
            "export_model=False",
            "optim.ema_decay=None",
            "data.path=/x/y",
            "async_checkpointing=true",
        ],
    )
    assert cfg.steps == 7 and cfg.optim.lr == 0.002 and cfg.data.path == "/x/y"
    assert cfg.export_model is False and cfg.optim.ema_decay is None and cfg.async_checkpointing is True


@pytest.mark.parametrize("bad", ["export_model=no", "export_model=0", "export_model=False!"])
def test_a_boolean_field_refuses_anything_but_a_boolean(bad):
    with pytest.raises(ValueError, match="export_model is a boolean"):
        load_config(CONFIGS / "shapes_dit.py", [bad])


def test_unknown_field_names_the_config_class():
    with pytest.raises(KeyError, match="ObjectiveConfig has no field 'timesteps'"):
        load_config(CONFIGS / "shapes_dit.py", ["objective.timesteps=uniform"])


def test_random_init_needs_no_transformer_in_the_model_folder(tmp_path):
    import shutil

    import jax

    from jaxedit.checkpoint import load_params
    from jaxedit.train.config import TrainConfig
    from jaxedit.train.loop import load_model
    from tests.tiny_train import random_model_folder

    folder = random_model_folder(tmp_path / "model")
    want = jax.tree.map(lambda a: a.shape, load_params(folder / "transformer"))
    shutil.rmtree(folder / "transformer")
    with pytest.raises(FileNotFoundError, match="missing transformer"):
        load_model(TrainConfig(model=str(folder), init="folder"))
    shutil.move(folder / "vae", tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="missing vae$"):  # the other parts are still required
        load_model(TrainConfig(model=str(folder), init="random"))
    shutil.move(tmp_path / "vae", folder / "vae")
    _, _, transformer, parts = load_model(TrainConfig(model=str(folder), init="random"))
    assert jax.tree.map(lambda a: a.shape, transformer) == want
    assert set(parts) == {"vae", "t5", "clip"}


def test_settings_a_run_cannot_honour_are_refused():
    """Not silently ignored: a guidance value for a model without a guidance embedding, zero steps, no model."""
    import dataclasses

    from jaxedit.train.config import TrainConfig
    from jaxedit.train.loop import check_config, load_model
    from jaxedit.train.objective import ObjectiveConfig

    step1x, kontext = presets.get("step1x-edit-tiny"), presets.get("flux-kontext-tiny")
    cfg = load_config(CONFIGS / "step1x_tiny.py")
    check_config(cfg, step1x)
    with pytest.raises(ValueError, match="objective.guidance=3.0: step1x-edit-tiny has no guidance embedding"):
        check_config(dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, guidance=3.0)), step1x)
    check_config(TrainConfig(objective=ObjectiveConfig(guidance=3.0)), kontext)  # Kontext embeds it
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        check_config(TrainConfig(steps=0), kontext)
    with pytest.raises(ValueError, match="set model=FOLDER"):
        load_model(TrainConfig())


def test_configs_by_name():
    """`--config NAME` finds the project's configs (shipped in the package as jaxedit/run_configs)."""
    from jaxedit.train.config import find_config

    assert find_config("kontext_tiny").resolve() == (CONFIGS / "kontext_tiny.py").resolve()
    assert find_config("kontext_tiny.py") == find_config("kontext_tiny")
    with pytest.raises(FileNotFoundError, match="config 'nope' not found: .*kontext_dev_lora"):
        find_config("nope")
