"""`python -m train --set a.b=value` overrides of the checked-in configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxedit.train.loop import load_config

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
