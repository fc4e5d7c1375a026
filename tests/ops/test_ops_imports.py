"""The op layer's imports: no cycle among its modules, and importing it reports nothing
(the live backends are reported when first worked out)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dalle3_fast"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that `path` imports anywhere (functions included), most specific first."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_op_layer_has_no_import_cycle():
    files = [PACKAGE / "_native.py", *sorted((PACKAGE / "ops").rglob("*.py"))]
    modules = {module_name(f): f for f in files}
    graph = {name: imports_of(f, set(modules)) - {name} for name, f in modules.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


_NOT_BUILT = """
import json, sys, warnings
class HideExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "dalle3_fast._C":
            raise ImportError("hidden by the test")
sys.meta_path.insert(0, HideExtension())
warnings.simplefilter("error")
import dalle3_fast.ops as ops
import dalle3_fast.models.unet_config
warnings.simplefilter("default")
import torch
compiled = torch.compile(lambda x, w, b: ops.group_norm_silu(x, w, b, 2), fullgraph=True, backend="aot_eager")
compiled(torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8))  # reporting is no part of the graph
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    live = ops.available_backends()
    ops.available_backends()
print(json.dumps([live, [str(w.message) for w in caught]]))
"""


def test_import_reports_nothing_and_first_use_warns_once_without_the_extension():
    """Also: a compiled first call (fullgraph) still works, the report staying out of the graph."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("DALLE3_FAST_NO_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", _NOT_BUILT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    live, messages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cpu" not in live
    assert len(messages) == 1 and "native extension is not built" in messages[0], messages
