"""The package layout of docs/architecture.md holds: imports go one way (the command line, semid_cli, on top; no
exemption), no cycle, no file over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("semid", "rqvae", "generator", "semid_cli")
LIBRARY = ("semid", "rqvae", "generator")  # below the command line (semid_cli), which may import all three
# generator's layers, lowest first: a module imports from its own layer or lower ones only. A design plug-in
# (generator.t5) spreads over the layers: each of its modules sits on the layer it belongs to, by the same rule.
LAYERS = (
    ("generator.models", "generator.t5.model"),
    ("generator.decoding", "generator.t5.step", "generator.t5.beam", "generator.t5.generate", "generator.t5.dense",
     "generator.t5.hybrid", "generator.t5.decoders"),
    ("generator.training", "generator.t5.data", "generator.t5.datamodule", "generator.t5.system"),
    ("generator.designs", "generator.t5.design"),
    ("generator.runs",),
    ("generator.serving",),
)
MAX_LINES = 410


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def imports_of(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
        found |= {n for n in names if n in MODULES}
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) for p in layer if module == p or module.startswith(p + ".")), None)


def test_every_generator_module_sits_on_a_layer() -> None:  # a new plug-in module must be placed, not skipped
    loose = [m for m in MODULES if m.startswith("generator.") and m.count(".") > 1 and _layer(m) is None]
    assert not loose, f"modules on no layer of LAYERS: {loose}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (package ``__init__`` modules that only hold a docstring never close one)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_there_is_no_import_cycle() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_the_cycle_finder_finds_one() -> None:  # the test above is not vacuous
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_generator_layers_import_downwards_only() -> None:
    wrong = [(m, n) for m, deps in GRAPH.items() for n in deps
             if _layer(m) is not None and _layer(n) is not None and _layer(n) > _layer(m)]
    assert not wrong, f"imports against the layer order {LAYERS}: {wrong}"


PLUGINS = ("generator.t5",)  # design plug-ins: each registers itself, imported by one module
REGISTRANT = "generator.designs.registry"


def _plugin(module: str) -> str | None:
    return next((p for p in PLUGINS if module == p or module.startswith(p + ".")), None)


def imports_of_plugins(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, plug-in module) imports of modules outside that plug-in, but for the one that registers plug-ins."""
    return [(m, n) for m, deps in graph.items() for n in deps
            if _plugin(n) is not None and _plugin(m) != _plugin(n) and m != REGISTRANT]


def test_only_the_design_registry_imports_a_plugin() -> None:
    wrong = imports_of_plugins(GRAPH)
    assert not wrong, f"general modules import a design plug-in (only {REGISTRANT} may, to register it): {wrong}"
    assert {n for n in GRAPH[REGISTRANT] if _plugin(n)} == {f"{p}.design" for p in PLUGINS}


def test_the_plugin_check_finds_a_general_import() -> None:  # the test above is not vacuous
    graph = {"generator.runs.recommender": {"generator.t5.dense"}, REGISTRANT: {"generator.t5.design"},
             "generator.t5.design": {"generator.t5.model", "generator.designs.base"}}
    assert imports_of_plugins(graph) == [("generator.runs.recommender", "generator.t5.dense")]


def test_decoders_do_not_import_the_registry_and_the_protocol_imports_no_decoder() -> None:
    registry, protocol = "generator.decoding.registry", "generator.decoding.protocol"
    users = [m for m, deps in GRAPH.items() if registry in deps and m.startswith("generator.decoding.")]
    assert not users, f"decoder modules import the registry (protocol <- decoders <- registry): {users}"
    assert not [n for n in GRAPH[protocol] if n.startswith("generator.")]


def _package(module: str) -> str:
    return module.split(".")[0]


def test_semid_and_rqvae_do_not_import_generator() -> None:
    for m, deps in GRAPH.items():
        if _package(m) in ("semid", "rqvae"):
            assert not [n for n in deps if _package(n) == "generator"], m
        if _package(m) == "rqvae":
            assert not [n for n in deps if _package(n) in ("semid", "semid_cli")], m


def test_nothing_in_the_library_imports_the_command_line() -> None:
    wrong = [(m, n) for m, deps in GRAPH.items() for n in deps if _package(m) in LIBRARY and _package(n) == "semid_cli"]
    assert not wrong, f"library modules import the command line (semid_cli sits above them): {wrong}"


def test_the_command_line_reaches_every_library_package() -> None:  # it may import them all, and does
    reached = {_package(n) for m, deps in GRAPH.items() if _package(m) == "semid_cli" for n in deps}
    assert set(LIBRARY) <= reached, f"semid_cli imports {sorted(reached)}"
    assert "semid_cli.codebooks" in MODULES and "semid.codebooks" in MODULES  # the folder's format in the library


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_over_about_400_lines(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines: split it by concept"
