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
