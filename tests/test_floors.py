"""The package's floors (DESIGN: errors/log -> config -> data -> cache and models -> train -> validate -> publish ->
commands/cli): a module imports only from its own floor and the floors below. Every import statement counts, those
inside functions and under TYPE_CHECKING too; the few upward ones are listed in EXCEPTIONS with their reason, and
are allowed only inside a function or under TYPE_CHECKING (never when the module itself is imported)."""

import ast
from pathlib import Path

import simpletuner

PACKAGE = Path(simpletuner.__file__).parent
FLOORS = {
    # leaves: one-line errors, logging, whole-file writes, and the tiny test models (diffusers/transformers only)
    "__init__": 0, "errors": 0, "log": 0, "atomic": 0, "testing": 0,
    "config": 1,
    "data": 2,
    "cache": 3, "models": 3,  # models also holds the objectives the families build (models/objectives.py, flow.py)
    "train": 4,
    "validate": 5, "validate_chain": 5,
    "publish": 6,
    "commands": 7, "cli": 7, "__main__": 7, "demo": 7,  # demo: `simpletuner demo`'s dataset, run and loss plot
}
# (importing module, imported module): why the import goes up a floor
EXCEPTIONS = {
    ("simpletuner.train.setup", "simpletuner.validate"):
        "a run's set-up builds its validation plan (the prompts and sizes) before the first step",
    ("simpletuner.train.trainer", "simpletuner.validate"):
        "the loop runs validation at the steps the configuration names",
    ("simpletuner.train.trainer", "simpletuner.publish.export"):
        "the loop writes each checkpoint's LoRA files and exports the model at the end of the run",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 1 else "__init__"]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported simpletuner module, line, whether the statement runs when the module is imported)."""
    found = []

    def visit(node: ast.AST, runs_at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.body:
                    visit(ast.Module(body=[statement], type_ignores=[]), False)
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), runs_at_import)
            else:
                if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith(
                        "simpletuner"):
                    found.append((child.module, child.lineno, runs_at_import))
                elif isinstance(child, ast.Import):
                    found.extend((alias.name, child.lineno, runs_at_import) for alias in child.names
                                 if alias.name.startswith("simpletuner"))
                visit(child, runs_at_import)

    visit(ast.parse(path.read_text()), True)
    return found


def test_every_module_has_a_floor():
    units = {module.split(".")[1] if "." in module else "__init__" for module in _modules()}
    assert units <= FLOORS.keys(), f"give these a floor: {sorted(units - FLOORS.keys())}"


def test_modules_import_only_from_their_floor_and_below():
    upward, used = [], set()
    for module, path in _modules().items():
        for imported, line, runs_at_import in _imports(path):
            if _floor(imported) <= _floor(module):
                continue
            if (module, imported) in EXCEPTIONS and not runs_at_import:
                used.add((module, imported))
                continue
            upward.append(f"{module}:{line} imports {imported}"
                          + (" when it is imported" if (module, imported) in EXCEPTIONS else ""))
    assert not upward, "imports going up a floor:\n" + "\n".join(upward)
    assert used == EXCEPTIONS.keys(), f"exceptions no longer needed: {sorted(EXCEPTIONS.keys() - used)}"


def test_the_floor_check_sees_imports_inside_functions_and_type_checking(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from simpletuner.train import x\n"
                      "def f():\n    import simpletuner.publish.export\nfrom simpletuner.errors import UserError\n")
    assert sorted(_imports(source)) == [("simpletuner.errors", 6, True), ("simpletuner.publish.export", 5, False),
                                        ("simpletuner.train", 3, False)]
