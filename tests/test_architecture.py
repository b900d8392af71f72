"""The package's shape: no import cycle, imports at the top of modules, one converter of images."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dragdiffusion"
# imported where they are used: optional dependencies (extras, or needing torchvision)
OPTIONAL = ("wandb", "gradio", "tensorboard", "torchvision", "torchmetrics.image.lpip", "psutil")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(node: ast.ImportFrom, here: str, package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = here.split(".") if package else here.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules imported at module level (``from .x import y`` counts x, and x.y if a module)."""
    here, out = module_name(path), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            target = resolve(node, here, is_package(path))
            if target in modules:
                out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def test_no_import_cycle():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: top_level_imports(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path[path.index(n):] + [n])}"
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_are_at_the_top_of_modules():
    """Only optional dependencies are imported inside functions, and command-line ``main`` functions, which parse
    the arguments before importing the heavy library (so that ``--help`` is instant)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    optional = any(name == o or name.startswith(o + ".") for o in OPTIONAL)
                    if not optional and func.name != "main":
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {func.name}: {name}")
    assert offenders == []


def test_one_module_converts_images():
    """Tensor <-> picture conversions (the [-1, 1] scaling, the uint8 rule) live in images.py only."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "images.py":
            continue
        text = path.read_text()
        for needle in ("/ 127.5", "* 255 + 0.5", "* 255).astype", "permute(2, 0, 1)", "permute(1, 2, 0)"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
