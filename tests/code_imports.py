"""What ctclab's code imports, read from its source (ast; nothing is imported): the stages' dvc.yaml
deps (test_dvc_yaml) and the dependency directions the README promises (test_structure)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ctclab"


def ctclab_imports(path: Path) -> set[str]:
    """ctclab modules a file imports (at any depth: lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ctclab.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y, inside the package
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module == "ctclab":
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("ctclab."):
                found.add(node.module.split(".")[1])
    return {m for m in found if (PACKAGE / f"{m}.py").is_file() or (PACKAGE / m / "__init__.py").is_file()}


def import_closure(script: Path) -> set[str]:
    """ctclab modules a script runs. A subpackage (archs, decoders) is a folder of plug-ins its
    registry imports whole at run time: it stands for every module there, and what they import."""
    seen, todo = set(), list(ctclab_imports(script))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [i for f in module_files(m) for i in ctclab_imports(f)]
    return seen


def module_files(module: str) -> list[Path]:
    """A module's source file, or every file of a subpackage (archs, decoders)."""
    folder = PACKAGE / module
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{module}.py"]


def reaches(module: str) -> set[str]:
    """Every ctclab module that importing `module` (or using its registry) runs."""
    return set().union(*(import_closure(f) for f in module_files(module))) - {module}


def outside_imports(path: Path) -> set[str]:
    """Top-level names of the non-ctclab packages a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"ctclab"}
