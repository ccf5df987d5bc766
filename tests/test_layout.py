"""The package layout: imports run down the layers (engine <- coding <- evaluation <- training <- commands), no
cycle inside a layer, the project's own modules imported at module top, and the kernels folder under a name of
its own."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CEC = ROOT / "cec"

# a module may import its own layer and the layers below it, never one above (training reads evaluation's metrics)
LAYERS = {"cec.errors": 0, "cec.io": 0, "cec.data": 0, "cec.engine": 1, "cec_kernels": 1, "cec.coding": 2,
          "cec.evaluation": 3, "cec.training": 4, "cec.cli": 5, "cec.commands": 5, "cec.serve": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module == "cec":  # the package's own __init__ (empty)
        return 0
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module}: no layer (add its package to LAYERS)")


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module top) for every import of cec or cec_kernels in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "cec":  # from cec import coding -> cec.coding
                names = [f"cec.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("cec", "cec_kernels", "kernels"):
                out.append((name, node.lineno, id(node) in top))
    return out


SOURCES = sorted(CEC.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in SOURCES:
        layer(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_the_layers(path):
    src = module_name(path)
    for target, line, _ in project_imports(path):
        assert target.split(".")[0] != "kernels", f"{path}:{line}: import cec_kernels, not kernels"
        assert layer(target) <= layer(src), f"{path}:{line}: {src} (layer {layer(src)}) imports {target} " \
                                            f"(layer {layer(target)}), a layer above it"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_project_imports_at_module_top(path):
    # the Triton kernel is the one optional project module: imported where Triton may be missing
    inner = [f"line {line}: {target}" for target, line, at_top in project_imports(path)
             if not at_top and not target.startswith("cec_kernels")]
    assert not inner, f"{path.relative_to(ROOT)} imports project modules inside functions: {inner}"


def test_no_import_cycle():
    graph = {module_name(p): {t for t, _, at_top in project_imports(p) if at_top} for p in SOURCES}
    # "from cec.engine import model" names a module, not the package: resolve to the longest known module
    known = set(graph)
    resolved = {m: {max((k for k in known if t == k or t.startswith(k + ".")), key=len, default=t)
                    for t in deps} - {m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path + [m])
        state[m] = 1
        for d in sorted(resolved.get(m, ())):
            if d in resolved:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(resolved):
        visit(m, [])


def test_kernels_folder_installs_as_cec_kernels(tmp_path):
    """A foreign `kernels` package (the Hub's, which transformers may import) neither shadows ours nor is
    shadowed by it: run outside the repo with one first on the path, the engine still finds its own kernel."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = ("import os; os.environ['CEC_TRITON_INTERPRET'] = '1'\n"
            "import kernels; assert kernels.FOREIGN, kernels.__file__\n"
            "from cec.engine import heads\n"
            "fn = heads._kernel()\n"
            "import cec_kernels.yesno_head as k\n"
            "print(k.__file__ if fn is not None else 'no triton')\n")
    env = {**os.environ, "PYTHONPATH": str(foreign.parent)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != "no triton":
        assert Path(out.stdout.strip()).resolve() == ROOT / "kernels" / "yesno_head.py"


def test_kernels_folder_hands_the_name_kernels_to_an_installed_package(tmp_path):
    """Run from the repository root (its folder first on sys.path, as `python -m pytest` and `python infer.py` put
    it), `import kernels` gives the package of that name found after it on the path (transformers imports the
    Hub's), and the engine still finds its own kernel as cec_kernels."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = ("import kernels, sys; print(getattr(kernels, 'FOREIGN', False), sys.path[0] == '')\n"
            "import cec_kernels.yesno_head as k; print(k.__file__)\n")
    for pythonpath, expected in ((str(foreign.parent), "True True"), ("", "False True")):
        env = {**os.environ, "PYTHONPATH": pythonpath}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        first, second = out.stdout.strip().splitlines()
        assert first == expected and Path(second).resolve() == ROOT / "kernels" / "yesno_head.py"
