"""The package layout holds: every package folder is installed under the one `paxlike` namespace,
and imports point down the layers (experiments -> models -> paxlike core and kernels; kernels
import nothing of the rest; the core never imports a model family or an experiment; the planner
never imports the trainer). Checked on the source with `ast`, so it needs no import."""

import ast
import os
import tomllib

import pytest

from configs import ROOT

# Installed package prefix -> folder of the repository.
FOLDERS = {"paxlike.kernels": "kernels", "paxlike.models": "models",
           "paxlike.experiments": "experiments", "paxlike": "paxlike"}


def _package_of(folder: str) -> str:
    """Installed name of a repository folder that holds an __init__.py."""
    top, _, rest = folder.partition(os.sep)
    prefix = next(p for p, f in FOLDERS.items() if f == top)
    return ".".join([prefix] + ([*rest.split(os.sep)] if rest else []))


def _modules():
    """(installed module name, path) of every Python module of the four trees."""
    for top in FOLDERS.values():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" not in files:
                continue
            package = _package_of(os.path.relpath(dirpath, ROOT))
            for name in files:
                if name.endswith(".py"):
                    module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                    yield module, os.path.join(dirpath, name)


def _imports(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the module's package
                package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def test_every_package_folder_is_installed_under_paxlike():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    setuptools = project["tool"]["setuptools"]
    for prefix, folder in FOLDERS.items():
        assert setuptools["package-dir"][prefix] == folder
    on_disk = {_package_of(os.path.relpath(d, ROOT))
               for top in FOLDERS.values() for d, _, files in os.walk(os.path.join(ROOT, top))
               if "__init__.py" in files}
    assert sorted(on_disk) == sorted(setuptools["packages"])


RULES = [
    # (importing modules, forbidden import prefixes, why)
    ("paxlike.kernels", ("paxlike.models", "paxlike.experiments", "paxlike."),
     "kernels import nothing of the rest"),
    ("paxlike.models", ("paxlike.experiments",), "models do not know the experiments"),
    ("paxlike.planner", ("paxlike.trainer", "paxlike.loop", "paxlike.compiled"),
     "the planner is arithmetic"),
]
CORE_FORBIDDEN = ("paxlike.models", "paxlike.experiments")
TOP_LEVEL_NAMES = ("kernels", "models", "experiments")


@pytest.mark.parametrize("module,path", sorted(_modules()))
def test_imports_point_down(module, path):
    imports = _imports(path, module)
    stray = sorted(i for i in imports if i.split(".")[0] in TOP_LEVEL_NAMES)
    assert not stray, f"{module} imports {stray}: use the paxlike.* names"
    in_core = not module.startswith(("paxlike.kernels", "paxlike.models", "paxlike.experiments"))
    if in_core:
        bad = sorted(i for i in imports if i.startswith(CORE_FORBIDDEN))
        assert not bad, f"{module} (core) imports {bad}: a config names the model family"
    for owner, forbidden, why in RULES:
        if module.startswith(owner):
            bad = sorted(i for i in imports if i.startswith(forbidden)
                         and not i.startswith(owner))
            assert not bad, f"{module} imports {bad}: {why}"
