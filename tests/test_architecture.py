"""The shape of the package: the library never reaches into the applications, speaks no
command-line flags, keeps typed records, keeps functions short, and selects inputs as the
command line does."""

from __future__ import annotations

import ast
import csv
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "advfast"
LIBRARY = ("ops", "engine", "attacks", "io", "errors.py", "models.py", "data.py", "__init__.py")
APPLICATIONS = ("advfast.experiments", "advfast.tools", "advfast.cli")
MAX_FUNCTION_LINES = 60


def library_files(package: Path = None) -> list[Path]:
    package = PACKAGE if package is None else package
    files = []
    for part in LIBRARY:
        path = package / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth, relative ones
    resolved; ``from a import b`` gives a and a.b; import_module("x") and __import__("x")
    give x."""
    name = module_name(path, package)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", None)
            if callee in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def application_imports(package: Path = None) -> list[str]:
    package = PACKAGE if package is None else package
    bad = []
    for path in library_files(package):
        for line, module in imported_modules(path, package):
            if any(module == app or module.startswith(app + ".") for app in APPLICATIONS):
                bad.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
    return bad


def test_the_library_imports_no_application():
    assert len(library_files()) > 10 and all(p.is_file() for p in library_files())
    bad = application_imports()
    assert not bad, "the library reaches into the applications:\n" + "\n".join(bad)


def _exception_names(package: Path) -> set[str]:
    import builtins

    names = {n for n, v in vars(builtins).items()
             if isinstance(v, type) and issubclass(v, BaseException)}
    errors = ast.parse((package / "errors.py").read_text())
    names |= {node.name for node in ast.walk(errors) if isinstance(node, ast.ClassDef)}
    return names


def _strings(node: ast.AST) -> list[str]:
    """Every string literal in an expression, f-strings' literal parts included."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def flag_messages(package: Path = None) -> list[str]:
    """Error messages in the library that name a command-line flag ("--")."""
    package = PACKAGE if package is None else package
    exceptions = _exception_names(package)
    bad = []
    for path in library_files(package):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            calls = []
            if isinstance(node, ast.Raise) and node.exc is not None:
                calls.append(node.exc)
            if isinstance(node, ast.Call):  # errors built first and raised later
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else \
                    getattr(node.func, "id", None)
                if callee in exceptions:
                    calls.append(node)
            for call in calls:
                args = call.args + [k.value for k in call.keywords] \
                    if isinstance(call, ast.Call) else [call]
                for text in (s for a in args for s in _strings(a)):
                    if "--" in text:
                        bad.append(f"{path.relative_to(package.parent)}:{node.lineno}: {text!r}")
    return sorted(set(bad))


def test_library_error_messages_name_no_command_line_flag():
    bad = flag_messages()
    assert not bad, "library errors that speak the command line's language:\n" + "\n".join(bad)


def long_functions(package: Path = None) -> list[str]:
    package = PACKAGE if package is None else package
    long = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(package.parent)}:{node.lineno} "
                                f"{node.name}: {lines} lines")
    return long


def test_no_function_is_longer_than_60_lines():
    long = long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


# --- typed records ------------------------------------------------------------------------

def _record(cls, batch: int, image: tuple[int, ...], gen: torch.Generator):
    """An instance of the slotted dataclass ``cls`` whose every field is a distinct random
    tensor with ``batch`` rows (image-shaped for the image fields of Adam)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        shape = (batch, *image) if f.name in ("w", "m", "v", "best_x") else (batch,)
        values[f.name] = torch.rand(shape, generator=gen)
    return cls(**values)


def _rows(batch=5):
    from advfast.engine.rows import start_rows
    from advfast.ops import HEAD_STATS

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 1, 4, 4, generator=gen)
    rows = start_rows(torch.arange(batch) * 10, x0, torch.randint(0, 10, (batch,), generator=gen),
                      torch.randint(0, 10, (batch,), generator=gen))
    rows.norms = torch.rand(batch, 3, generator=gen)
    rows.head = torch.rand(batch, len(HEAD_STATS), generator=gen)
    rows.constant = torch.rand(batch, generator=gen)
    return rows, gen


def test_records_refuse_a_field_they_do_not_declare():
    from advfast.engine.control import CWState
    from advfast.engine.optim import AdamState

    rows, gen = _rows()
    for record in (rows, _record(AdamState, 5, (1, 4, 4), gen),
                   _record(CWState, 5, (1, 4, 4), gen)):
        with pytest.raises(AttributeError):
            record.not_a_field = torch.zeros(5)
        assert not hasattr(record, "not_a_field")


def test_take_gathers_every_field_and_the_nested_records_with_one_index():
    import dataclasses

    from advfast.engine.control import CWState
    from advfast.engine.optim import AdamState

    rows, gen = _rows()
    rows.optim = _record(AdamState, 5, (1, 4, 4), gen)
    rows.control = _record(CWState, 5, (1, 4, 4), gen)
    index = torch.tensor([3, 0, 4])
    taken = rows.take(index)
    assert len(taken) == 3 and taken.x.requires_grad
    for record, original in ((taken, rows), (taken.optim, rows.optim),
                             (taken.control, rows.control)):
        for f in dataclasses.fields(original):
            value = getattr(original, f.name)
            if value is None or f.name in ("optim", "control"):
                continue
            expected = value.detach()[[3, 0, 4]]  # plain indexing, row by row
            torch.testing.assert_close(getattr(record, f.name).detach(), expected, rtol=0,
                                       atol=0, equal_nan=True, msg=f.name)


# --- one input-selection path -------------------------------------------------------------

def test_the_api_and_the_command_line_select_the_same_inputs_and_targets(tmp_path):
    from advfast import cli, models
    from advfast.io.selection import DigitsSource, prepare

    chosen, _ = prepare(models.load("digits"), DigitsSource("test"), 16, seed=3)
    out = tmp_path / "out"
    assert cli.main(["attack", "--n", "16", "--seed", "3", "--out", str(out), "--iterations",
                     "1", "--quiet"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 16
    assert [int(m["index"]) for m in metrics] == chosen.index.tolist()
    assert [int(m["target"]) for m in metrics] == chosen.targets.tolist()
    assert [int(m["label"]) for m in metrics] == chosen.labels.tolist()
    assert os.path.isfile(out / "adversarial.safetensors")
