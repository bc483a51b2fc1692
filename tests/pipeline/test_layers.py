"""The runtime's packages import one way, down the data flow's layers, and never in a cycle.

Read from the source (every ``import`` in every module of ``pipeline/``, lazy ones and
``TYPE_CHECKING`` ones included, since a lazy import is still a dependency), not by
importing anything: a new upward arrow or a cycle fails here, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

# Lowest first. A module may import its own unit and any unit on a lower layer; units on
# one layer do not import each other. A unit is a subpackage or a top-level module.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("features", "transport", "telemetry"),  # numpy front end; the MQTT client; metrics
    ("contract",),  # reads features' log-mel settings out of a model's metadata
    ("model",),
    ("engine",),  # step types, runner, worker, store
    ("offline", "sinks"),  # data sets and scoring; predictions out
    ("sources",),  # payloads in (reports rejections through the sinks)
    ("keywords",),  # audio sources + features + engine -> keyword events
    ("daemon",),  # the TOML reader and the composition root import everything below
    ("cluster",),  # the daemon over NATS JetStream
    ("commands",),
    ("cli",),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """``pipeline.engine.store.state`` -> ``engine``; ``pipeline`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, package: str = "pipeline") -> list[tuple[int, str]]:
    """(line, module) of every import of ``package`` in ``path``, wherever it appears."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".")
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # "from pipeline.x import y" may name a submodule y: count it as one.
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            found.append((node.lineno, mod))
    return [(line, m) for line, m in found if m == package or m.startswith(f"{package}.")]


def modules() -> list[Path]:
    return sorted(PIPELINE.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in modules()} - {""}
    assert units <= set(RANK), f"put {sorted(units - set(RANK))} on a layer in LAYERS"


def test_imports_run_down_the_layers() -> None:
    upward = []
    for path in modules():
        mine = unit_of(module_name(path))
        if not mine:
            continue  # pipeline/__init__.py: the version, nothing else
        for line, target in imports(path):
            theirs = unit_of(target)
            if theirs in ("", mine) or theirs not in RANK:
                continue
            if RANK[theirs] >= RANK[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules() -> None:
    known = {module_name(p): p for p in modules()}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for _, target in imports(path):
            # the longest known module the import names ("pipeline.a.b.C" -> "pipeline.a.b")
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from pipeline.daemon.config import Settings\n", "transport imports pipeline.daemon"),
        (
            "def f():\n    from pipeline.sources import codecs\n",
            "transport imports pipeline.sources",
        ),
    ],
)
def test_the_check_sees_upward_imports(tmp_path: Path, source: str, bad: str) -> None:
    """The walker finds module-level and lazy imports alike (else the tests above prove nothing)."""
    fake = PIPELINE / "transport" / "_layers_probe.py"
    try:
        fake.write_text(source, encoding="utf-8")
        with pytest.raises(AssertionError, match=bad):
            test_imports_run_down_the_layers()
    finally:
        fake.unlink()


def test_no_runtime_module_names_torch_even_lazily() -> None:
    """Stronger than importing everything (tests/pipeline/test_no_torch.py): a lazy
    ``import torch`` inside a function (an optional baseline, say) belongs in ``models/``."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for path in modules()
        for line, target in imports(path, "torch")
    ]
    assert not found, "torch imported in the runtime package:\n" + "\n".join(found)
