"""The code layout, checked from the source (ast): imports run one way, no import cycle, no private
name crosses a module boundary, the library imports neither torch nor the converter nor an entry
point, and no code path names a folder outside the repository."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# our importable top-level packages; tests and benchmarks are leaves nothing imports
PACKAGES = ("jaxedit", "checkpoints_convert", "infer", "train", "shapes", "references", "tests")
LIBRARY = ("jaxedit",)
# attributes with a leading underscore that are public APIs of other libraries, and the reference
# implementations' own helpers the parity tests call on purpose (diffusers, transformers)
FOREIGN_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_value_", "_cache_size"} | {
    "_pack_latents",
    "_unpack_latents",
    "_prepare_latent_image_ids",
    "_get_t5_prompt_embeds",
    "_get_clip_prompt_embeds",
    "_relative_position_bucket",
    "_convert_kohya_flux_lora_to_diffusers",
    "_convert_fal_kontext_lora_to_diffusers",
}


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def imported(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def edges() -> dict[str, set[str]]:
    """Module -> our modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, names, _ in imported(module, path):
            if not ours(target):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in subs or [target]:
                if t != module:
                    graph[module].add(t)
    return graph


def test_no_import_cycles():
    graph = edges()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_one_way():
    """The library imports no converter, entry point, demo task, test or torch reference; models import no
    pipeline or training code; the converter imports no entry point."""
    rules = {
        "jaxedit": ("checkpoints_convert", "infer", "train", "shapes", "references", "tests"),
        "jaxedit.models": ("jaxedit.pipelines", "jaxedit.kontext", "jaxedit.step1x", "jaxedit.train", "jaxedit.cli"),
        "jaxedit.parallel": ("jaxedit.models", "jaxedit.pipelines", "jaxedit.kontext", "jaxedit.step1x"),
        "checkpoints_convert": ("infer", "train", "shapes", "references", "tests", "jaxedit.cli"),
        "references": ("tests",),
    }
    bad = []
    for module, targets in edges().items():
        for prefix, banned in rules.items():
            if module == prefix or module.startswith(prefix + "."):
                bad += [
                    f"{module} imports {t}" for t in targets if any(t == b or t.startswith(b + ".") for b in banned)
                ]
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module_boundary():
    """`from ours import _x` and `<not self/cls>._x` (a private attribute reached from outside) do not occur."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, names, line in imported(module, path):
            if ours(target):
                bad += [f"{path.relative_to(ROOT)}:{line}: imports {target}.{n}" for n in names if _private(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in FOREIGN_UNDERSCORE:
                base = node.value
                if not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr} of {ast.unparse(base)}")
    assert not bad, "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_library_never_imports_torch():
    """torch is a test-time reference only: no exception (Step1X-Edit's Qwen2.5-VL runs in JAX)."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in MODULES.items()
        if module.split(".")[0] in ("jaxedit", "checkpoints_convert", "infer", "train")
        for target, _, line in imported(module, path)
        if target.split(".")[0] == "torch"
    ]
    assert not bad, f"torch imported by library code: {bad}"


def test_nothing_names_a_folder_outside_the_repository():
    """No source file reaches beside the checkout (a sibling folder, `parents[2]`, ...): a user's clone has
    only the repository. (tests/conftest.py also fails any test that opens such a file.)"""
    sibling = "shared"  # the folder beside our checkouts that a user's clone does not have
    pattern = re.compile(rf"\.\./{sibling}|{sibling}/reference|parents\[[2-9]\]|parent\.parent\.parent")
    folders = [ROOT / d for d in (*PACKAGES, "configs", "benchmarks", ".ci")]
    files = [
        ROOT / "pyproject.toml",
        *(p for d in folders for p in d.rglob("*") if p.suffix == ".py" or p.name == "run"),
    ]
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        if p != Path(__file__).resolve()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, f"paths outside the repository: {bad}"


def test_weights_are_loaded_from_safetensors_only():
    """Every `from_pretrained` / `load_lora_weights` call that loads weights through transformers or diffusers
    passes `use_safetensors=True`: a folder holding only a pickled `.bin` is refused, never unpickled.
    (Tokenizers, image processors and our own wrappers, which pass it themselves, load no pickled weights.)"""
    not_weights = re.compile(r"tokenizer|processor|TorchQwenEmbedder", re.IGNORECASE)
    files = [p for d in (*PACKAGES, "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    sources = {p: p.read_text() for p in files}
    bad, seen = [], 0
    for path, text in sources.items():
        if "from_pretrained" not in text and "load_lora_weights" not in text:
            continue
        for node in ast.walk(ast.parse(text, str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("from_pretrained", "load_lora_weights"):
                continue
            if not_weights.search(ast.unparse(node.func.value)):
                continue
            seen += 1
            flag = next((k.value for k in node.keywords if k.arg == "use_safetensors"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node.func)}")
    assert seen >= 3, "the check found no weight loads: did the calls move?"
    assert not bad, f"weights loaded without use_safetensors=True: {bad}"


def test_every_replacing_write_goes_through_jaxedit_staged():
    """Write beside, then rename (STYLE 15) is implemented once, in `jaxedit.staged` (files and folders): no other
    module of the library, the converter or the entry points renames a file or folder into place itself
    (`os.replace` / `os.rename`, or a one-argument `Path.replace` / `Path.rename`), and `jaxedit.staged` imports
    none of our modules."""
    bad = []
    for module, path in MODULES.items():
        if (
            module.split(".")[0] not in ("jaxedit", "checkpoints_convert", "infer", "train")
            or module == "jaxedit.staged"
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, base = node.func.attr, ast.unparse(node.func.value)
            if (base == "os" and name in ("replace", "rename")) or (
                name in ("replace", "rename") and base != "os" and len(node.args) == 1 and not node.keywords
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "renames outside jaxedit.staged:\n" + "\n".join(bad)
    assert not edges().get("jaxedit.staged"), edges()["jaxedit.staged"]


# Every shared module (library, converter, entry points; not the tests and references, which test each family)
# asks the model's family (`jaxedit.families`, the converter's `checkpoints_convert.family`) instead of testing
# which family it has (STYLE 16). Family-specific code lives in the family's own modules (FAMILY_MODULES).
SHARED_PACKAGES = ("jaxedit", "checkpoints_convert", "train", "infer")
# the registry, and the config types (one per model, named after it: defining them is not a test)
NOT_CHECKED = ("jaxedit.families", "jaxedit.configs")
# a family's own modules: shared code reaches them through `jaxedit.families` only
FAMILY_MODULES = ("jaxedit.families.", "jaxedit.kontext", "jaxedit.step1x", "jaxedit.models.step1x",
                  "jaxedit.models.connector", "jaxedit.names.step1x", "checkpoints_convert.kontext",
                  "checkpoints_convert.step1x",
                  "jaxedit.qwen_image", "jaxedit.models.qwen_image", "jaxedit.names.qwen_image",
                  "checkpoints_convert.qwen_image")  # fmt: skip
# in identifiers (a docstring may name a family)
FAMILY_WORDS = re.compile(r"step1x|kontext|qwen_?image", re.IGNORECASE)
FAMILY_FIELDS = ("connector", "qwen", "t5", "clip")  # preset fields only some families have
FAMILY_KEYS = ("txt_mask",)  # batch keys only some families' batches have


def family_tests(module: str, path: Path) -> list[str]:
    """Where the module's code (not its docstrings) tests or names which family it has: imports of a family's
    own modules, identifiers naming a family, a family name or family-only batch key as a value, a comparison
    of a `family`, a read of a preset's family-only field (passing it on as the keyword of the same name is
    not a test)."""
    from jaxedit import families

    names = set(families.names()) | set(FAMILY_KEYS)
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    passed_on = {id(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords
                 if isinstance(k.value, ast.Attribute) and k.arg == k.value.attr}  # fmt: skip
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    where = lambda node: f"{rel}:{getattr(node, 'lineno', '?')}"  # noqa: E731
    bad = [f"{rel}:{line}: imports {t}" for t, _, line in imported(module, path) if t.startswith(FAMILY_MODULES)]
    for node in ast.walk(tree):
        ident = (
            node.id if isinstance(node, ast.Name)
            else node.attr if isinstance(node, ast.Attribute)
            else node.name if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.alias)
            else node.arg if isinstance(node, ast.arg | ast.keyword) and node.arg
            else ""
        )  # fmt: skip
        if FAMILY_WORDS.search(ident):
            bad.append(f"{where(node)}: names a family ({ident})")
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
            bad.append(f"{where(node)}: the value {node.value!r}")
        if (isinstance(node, ast.Attribute) and node.attr in FAMILY_FIELDS and id(node) not in passed_on
                and ast.unparse(node.value).endswith("preset")):  # fmt: skip
            bad.append(f"{where(node)}: reads {ast.unparse(node)}")
        if isinstance(node, ast.Compare) and any(isinstance(x, ast.Attribute) and x.attr == "family"
                                                 for x in ast.walk(node)):  # fmt: skip
            bad.append(f"{where(node)}: compares {ast.unparse(node)}")
    return bad


def shared_modules() -> list[str]:
    """The modules outside any family's own (FAMILY_MODULES, the registry `jaxedit.families`)."""
    return [m for m in MODULES if m.split(".")[0] in SHARED_PACKAGES and m not in NOT_CHECKED
            and not m.startswith(FAMILY_MODULES)]  # fmt: skip


def test_shared_code_asks_the_family():
    """No shared module tests which model family it has (`family_tests`)."""
    assert {"jaxedit.cli", "jaxedit.plan", "checkpoints_convert.pipeline", "train.__main__"} <= set(shared_modules())
    bad = [b for m in shared_modules() for b in family_tests(m, MODULES[m])]
    assert not bad, "shared code testing which family it has (ask `jaxedit.families` instead):\n" + "\n".join(bad)


def test_family_modules_import_only_the_registry_and_configs():
    """A family module imports only `jaxedit.families` and `jaxedit.configs` when it is imported (its models,
    pipeline and training pieces inside the methods using them): the model folder and LoRA layers ask it about
    parts without pulling in pipelines or jax, and the registry (`jaxedit.families.MODULES`) loads it by name."""
    from jaxedit import families

    assert sorted(families.MODULES) == sorted(m for m in MODULES if m.startswith("jaxedit.families."))
    bad = []
    for module in ("jaxedit.families", *families.MODULES):
        path = MODULES[module]
        for node in ast.parse(path.read_text(), str(path)).body:  # module level only
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                taken = [] if isinstance(node, ast.Import) else [a.name for a in node.names]
                ok = all(not ours(t) or t == "jaxedit.families" or (t == "jaxedit" and taken == ["configs"])
                         for t in targets)  # fmt: skip
                bad += [] if ok else [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"]
    assert not bad, "family modules importing more than the registry and configs at import:\n" + "\n".join(bad)


def test_the_family_check_sees_a_family_test(tmp_path):
    """`family_tests` flags each kind of family test it looks for."""
    src = tmp_path / "shared.py"
    src.write_text(
        '"""Mentions step1x-edit in a docstring: fine."""\n'
        "from jaxedit.step1x.text import QwenEmbedderConfig\n"
        "def f(preset, batch, run):\n"
        "    step1x = preset.connector is not None\n"
        '    if preset.family == "step1x-edit" or "txt_mask" in batch:\n'
        "        return preset.t5.max_length, run.preset.qwen\n"
        "    return g(connector=preset.connector)\n"
    )
    found = family_tests("shared", src)
    text = "\n".join(found)
    for expected in ("imports jaxedit.step1x.text", "names a family (step1x)", "reads preset.connector",
                     "compares preset.family == 'step1x-edit'", "the value 'step1x-edit'", "the value 'txt_mask'",
                     "reads preset.t5", "reads run.preset.qwen"):  # fmt: skip
        assert expected in text, (expected, text)
    assert "docstring" not in text and len(found) == 8, text  # the pass-through keyword is not flagged


def test_every_package_is_in_the_wheel():
    """Each library package (a folder with __init__.py) is listed in pyproject.toml's packages: an installed
    jaxedit lacks any that is not (a family's package left out breaks that family only once installed)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("jaxedit", "checkpoints_convert")
             for p in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    assert found <= listed, sorted(found - listed)
