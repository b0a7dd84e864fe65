import os
import sys

# 8 fake CPU devices for the sharding tests: must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests compile from scratch (the persistent compilation cache is tested explicitly)
os.environ["JAXEDIT_CACHE_DIR"] = "off"
# Make `tests.helpers` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    """(diffusers FluxKontextPipeline with random weights, jaxedit model folder converted from it)."""
    from checkpoints_convert.__main__ import main as convert_cli
    from tests.tiny_pipeline import build_diffusers_kontext

    root = tmp_path_factory.mktemp("kontext")
    ref = build_diffusers_kontext(root)
    dst = root / "jax"
    assert convert_cli(["pipeline", str(root / "diffusers"), str(dst), "--preset", "flux-kontext-tiny"]) == 0
    return ref, dst


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(folder of a tiny random Qwen2.5-VL with an offline tokenizer, its QwenEmbedderConfig)."""
    pytest.importorskip("torch")
    from tests.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("qwen"))
