"""The dependency direction of docs/architecture.md, checked two ways: what importing a module pulls
into `sys.modules`, and every import statement in the source (those inside functions too, which
importing alone would not run).

    core (clapjax/*, not clapjax/app)  ←  convert/, train/  ←  facade (clapjax/app: API, CLI, demo)
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"core": "clapjax", "convert": "convert", "train": "train"}
PACKAGE = {"core": "clapjax", "convert": "clapjax.convert", "train": "clapjax.train"}


def _modules(layer: str) -> dict[str, str]:
    """Module name → file, for every module of a layer (core: clapjax/ without clapjax/app/)."""
    base = os.path.join(ROOT, FOLDERS[layer])
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in ("app", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), base)[:-3].replace(os.sep, ".")
                rel = rel.removesuffix("__init__").rstrip(".")
                out[".".join(p for p in (PACKAGE[layer], rel) if p)] = os.path.join(dirpath, name)
    return out


def _imports(path: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names) of every import statement in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, tuple(a.name for a in node.names)))
    return out


def _targets(module: str, names: tuple[str, ...]) -> list[str]:
    """The modules an import statement may reach: `from clapjax import train` reaches clapjax.train."""
    return [module] + [f"{module}.{n}" for n in names] + (["clapjax.app"] if module == "clapjax" and "CLAP" in names else [])


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


FORBIDDEN = {"core": ("clapjax.convert", "clapjax.train", "clapjax.app"),
             "convert": ("clapjax.app",), "train": ("clapjax.app",)}


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_import_statements_point_down(layer):
    bad = []
    for module, path in _modules(layer).items():
        if module == "clapjax":
            continue  # the package's lazy `clapjax.CLAP` (a module __getattr__): the facade's front door, run on use
        for line, target, names in _imports(path):
            for reached in _targets(target, names):
                if any(_inside(reached, f) for f in FORBIDDEN[layer]):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {reached}")
    assert not bad, "\n".join(bad)


def test_convert_and_train_use_only_public_names_of_each_other():
    bad = []
    for layer, other in (("convert", "train"), ("train", "convert")):
        for module, path in _modules(layer).items():
            for line, target, names in _imports(path):
                if _inside(target, PACKAGE[other]):
                    private = [n for n in (target.split(".")[-1], *names) if n.startswith("_")]
                    if private:
                        bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} {private}")
    assert not bad, "\n".join(bad)


def test_importing_a_layer_loads_nothing_above_it():
    """Every module of each layer imported in a fresh interpreter: nothing above it is loaded."""
    script = (
        "import importlib, json, sys\n"
        "mods = json.loads(sys.argv[1]); forbidden = json.loads(sys.argv[2])\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if any(k == f or k.startswith(f + '.') for f in forbidden))))\n")
    import json
    for layer, forbidden in FORBIDDEN.items():
        mods = sorted(_modules(layer))
        assert len(mods) > 5, mods  # the walk found the layer
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(mods), json.dumps(list(forbidden))],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], f"importing {layer} loaded {proc.stdout}"


def _defined(path: str) -> set[str]:
    """Top-level names a module defines or imports."""
    names = set()
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_clapjax_import_names_something_that_exists():
    """Static: a moved module or name leaves no import behind, not even one inside a function that
    only a rarely run path reaches (tests, benchmarks and the facade included)."""
    known = {}
    for layer in FOLDERS:
        known.update(_modules(layer))
    app = os.path.join(ROOT, "clapjax", "app")
    known.update({"clapjax.app" + ("" if f == "__init__.py" else "." + f[:-3]): os.path.join(app, f)
                  for f in os.listdir(app) if f.endswith(".py")})
    files = list(known.values())
    for folder in ("tests", "benchmarks"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    bad = []
    for path in files:
        for line, module, names in _imports(path):
            if not _inside(module, "clapjax"):
                continue
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if module not in known:
                bad.append(f"{where}: no module {module}")
                continue
            bad += [f"{where}: {module} has no {n}" for n in names
                    if f"{module}.{n}" not in known and n not in _defined(known[module]) and n != "*"]
    assert not bad, "\n".join(bad)
