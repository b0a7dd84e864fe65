import os
import sys

# 8 fake CPU devices for the sharding tests: must be set before jax is imported. The tests' programs are
# tiny, so their time is XLA's compile time: LLVM's cheap pipeline (opt level 0, no expensive passes)
# compiles them a third faster, and XLA:CPU's older (LLVM IR) fusion emitters in place of the MLIR ones
# another 30% (a trivial elementwise program: 150 -> 90 ms; tests/test_sharding.py and
# test_train_objective.py: 165 -> 117 s; 2026-12-02). They change no HLO, only how the CPU code is
# generated (also inherited by the tests' subprocesses). Benchmarks and users do not run under them (the
# MLIR emitters' code runs the shapes train step ~10% faster).
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
FLAGS += " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests compile from scratch (the persistent compilation cache is tested explicitly)
os.environ["JAXEDIT_CACHE_DIR"] = "off"
# torch (the references only) runs one thread in each of the two xdist workers: two workers on 2 cores, each
# torch taking 2 threads, oversubscribe the machine (a tiny diffusers forward took 0.8 s instead of 0.015 s)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Make `tests.helpers`, `references` and `shapes` importable.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tempfile  # noqa: E402

import pytest  # noqa: E402

# Nothing beside the checkout may be read (a user's clone has only the repository): every file this
# process opens under the checkout's parent folder must be inside the checkout (or a temporary folder).
_OUTSIDE: list[str] = []


# resolved before the hook is installed: gettempdir's first call opens probe files under its lock, and a
# hook calling it from inside that open would wait on the lock forever (seen with `pytest -s`)
_TMP = os.path.realpath(tempfile.gettempdir())


def _watch_opens(event: str, args: tuple) -> None:
    if event != "open" or not args or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    parent, tmp = os.path.dirname(ROOT), _TMP
    inside = lambda p, d: p == d or p.startswith(d + os.sep)  # noqa: E731
    if inside(path, parent) and not inside(path, ROOT) and not inside(os.path.realpath(path), tmp):
        _OUTSIDE.append(path)


sys.addaudithook(_watch_opens)


@pytest.fixture(autouse=True)
def nothing_read_outside_the_repository():
    """Fails a test that opened a file beside the checkout (a sibling folder of the checkout)."""
    before = len(_OUTSIDE)
    yield
    if len(_OUTSIDE) > before:
        pytest.fail(f"read outside the repository: {sorted(set(_OUTSIDE[before:]))[:5]}")


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    """(diffusers FluxKontextPipeline with random weights, jaxedit model folder converted from it)."""
    from checkpoints_convert.__main__ import main as convert_cli
    from references.models import kontext_pipeline

    root = tmp_path_factory.mktemp("kontext")
    ref = kontext_pipeline(root)
    dst = root / "jax"
    assert convert_cli(["pipeline", str(root / "diffusers"), str(dst), "--preset", "flux-kontext-tiny"]) == 0
    return ref, dst


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(folder of a tiny random Qwen2.5-VL with an offline tokenizer, its QwenEmbedderConfig)."""
    pytest.importorskip("torch")
    from tests.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("qwen"))


# Seconds each file takes on the 2-core machine (measured; rounded): the two xdist workers take whole files
# (--dist loadfile) in collection order, so the longest go first and the short ones fill in at the end
# (otherwise the alphabetically last, long files left one worker idle for ~40 s). Unlisted files: short.
FILE_SECONDS = {
    "test_tpu_compile.py": 129, "test_sharding.py": 122, "test_flux_parity.py": 100, "test_infer_cli.py": 94,
    "test_train_objective.py": 95, "test_step1x_pipeline.py": 71, "test_pipeline.py": 69, "test_qwen.py": 55,
    "test_install.py": 51, "test_attention.py": 47, "test_train_cache_vae.py": 43, "test_vae.py": 38,
    "test_step1x_train.py": 38, "test_step1x.py": 37, "test_text_encoders.py": 32, "test_default_model.py": 31,
    "test_faults.py": 40, "test_lora_formats.py": 30, "test_lora.py": 25, "test_train_monitor.py": 17,
    "test_step1x_text.py": 13, "test_quant.py": 30, "test_qwen_generate.py": 60, "test_step_cache.py": 150,
    "test_qwen_image_step_cache.py": 45, "test_flux_scheduler.py": 45, "test_eval.py": 25, "test_clip_metrics.py": 30,
    "test_eval_order.py": 30,
}  # fmt: skip


def pytest_collection_modifyitems(items):
    """`full_depth_slow`: slow only in its full-depth (19+38 blocks) parametrisation. Files ordered longest
    first (FILE_SECONDS; a stable sort: the tests of a file keep their order)."""
    for item in items:
        if item.get_closest_marker("full_depth_slow") and "depth19+38" in item.name:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
