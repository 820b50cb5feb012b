"""Dependencies point one way (docs/DESIGN.md, "Layers").

`protocol` and `evidence_format` at the bottom; `firmware` and `control_center` above them and
never importing each other; `provisioning`, `simulator` and `bench` on top. The pure cores (the
state machines and decoders tested with exact clocks) import no adapter: no storage, sockets,
threads, clock or hardware library, and no firmware module that has one.

Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS: dict[str, set[str]] = {  # package -> the project packages it may import
    "protocol": set(),
    "evidence_format": {"protocol"},
    "firmware": {"protocol", "evidence_format"},
    "control_center": {"protocol", "evidence_format"},
    "provisioning": {"protocol", "evidence_format", "firmware", "control_center"},
    "simulator": {"protocol", "evidence_format", "firmware", "control_center"},
    "bench": {"protocol", "evidence_format", "firmware", "control_center", "simulator"},
}

PURE_CORES = {
    "firmware.alert_state",
    "firmware.sos_button.logic",
    "firmware.sos_button.states",
    "firmware.gps.fix",
    "firmware.gps.nmea",
    "firmware.camera.frames",
    "firmware.camera.health",
    "firmware.camera.segmenter",
    "firmware.camera.space",
    "firmware.camera.recording",
    "firmware.uplink.outgoing",
    "firmware.uplink.delivery",
    "firmware.uplink.upload_plan",
    "firmware.uplink.upload_machine",
    "firmware.voice.message",
    "firmware.voice.duplex",
    "firmware.tamper.logic",
    "firmware.audio.pacing",
    "firmware.camera.avsync",
}

# I/O, threads or the wall clock: what a pure core must not reach. (`logging` is allowed: where
# a line goes is the adapter's choice, made when it configures logging.)
ADAPTER_LIBRARIES = {
    "os", "io", "time", "socket", "ssl", "select", "selectors", "sqlite3", "threading", "queue",
    "subprocess", "shutil", "pathlib", "tempfile", "asyncio", "concurrent", "http", "urllib",
    "signal", "fcntl", "serial", "paho", "gpiozero", "picamera2", "av", "boto3", "aiortc",
    "aioice",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _from_module(path: Path, node: ast.ImportFrom) -> str:
    """The module of `from m import n`, a relative one resolved against `path`'s package."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    base = package[:len(package) - node.level + (path.name == "__init__.py")]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports, anywhere in it, relative imports resolved: for
    `from m import n`, m."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(_from_module(path, node))
    return found


def imports(path: Path) -> set[str]:
    """`imported_modules`, plus m.n for every `from m import n` (n may be a module)."""
    found = imported_modules(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = _from_module(path, node)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = [f"{path.relative_to(REPO)} imports {name}"
             for path in sources(package) for name in sorted(imports(path))
             if name.split(".")[0] in LAYERS
             and name.split(".")[0] not in LAYERS[package] | {package}]
    assert not wrong, "\n".join(wrong)


def test_every_package_of_the_project_has_a_layer() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("core", sorted(PURE_CORES))
def test_a_pure_core_imports_no_adapter(core: str) -> None:
    path = REPO / Path(*core.split(".")).with_suffix(".py")
    wrong = []
    for name in sorted(imports(path)):
        top = name.split(".")[0]
        if top in ADAPTER_LIBRARIES:
            wrong.append(f"{core} imports {name}")
        elif top == "firmware" and not any(name == c or name.startswith(c + ".")
                                           or c.startswith(name + ".") or c == name
                                           for c in PURE_CORES):
            wrong.append(f"{core} imports the adapter module {name}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    """The rule would be empty if `imports` missed the lazy imports the CLIs use."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from control_center.fleet import Fleet\n")
    assert "control_center.fleet" in imports(source)


def exists(module: str) -> bool:
    path = REPO / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_import_of_the_project_names_a_module_that_is_there(package: str) -> None:
    """A module moved to another layer leaves no import behind (relative ones included)."""
    missing = [f"{path.relative_to(REPO)} imports {name}"
               for path in sources(package) for name in sorted(imported_modules(path))
               if name.split(".")[0] in LAYERS and not exists(name)]
    assert not missing, "\n".join(missing)
