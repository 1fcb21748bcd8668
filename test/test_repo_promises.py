"""The README's two commands, .ci/run, the import boundaries and ruff: the promises the repo makes."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first = text.split("\n## ", 2)[1]  # the first section after the title
    return [line.strip() for line in re.findall(r"```(?:bash|sh)?\n(.*?)```", first, re.S)]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "pi-policy demo" in cmds[0] and "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_only_the_adapters_import_ros_or_tensorrt():
    pattern = re.compile(r"^\s*(import|from)\s+(rclpy|tensorrt|cv_bridge|launch|launch_ros|sensor_msgs|"
                         r"trajectory_msgs|diagnostic_msgs|std_msgs|builtin_interfaces|rcl_interfaces)\b", re.M)
    offenders = []
    for path in (ROOT / "pi_policy").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("pi_policy/ros/") or rel == "pi_policy/runtime/prefill/tensorrt.py":
            continue
        if pattern.search(path.read_text()):
            offenders.append(rel)
    assert not offenders


def test_everything_outside_ros_imports_without_ros():
    code = ("import importlib, pkgutil, pi_policy\n"
            "for m in pkgutil.walk_packages(pi_policy.__path__, 'pi_policy.'):\n"
            "    if not m.name.startswith('pi_policy.ros') and m.name != 'pi_policy.__main__':\n"
            "        importlib.import_module(m.name)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    result = subprocess.run([ruff, "check", "pi_policy", "test", "scripts", "launch"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# Each package may import only from the layers below it: tools -> bag, ros, serve -> node -> runtime -> model.
LAYERS = {"model": set(), "runtime": {"model"}, "node": {"runtime", "model"},
          "bag": {"node", "runtime", "model"}, "ros": {"node", "runtime", "model"},
          "serve": {"node", "runtime", "model"}, "tools": {"bag", "serve", "node", "runtime", "model"}}


def test_imports_run_down_the_layers():
    pattern = re.compile(r"^\s*(?:from|import)\s+pi_policy\.(\w+)", re.M)
    offenders = []
    for layer, allowed in LAYERS.items():
        for path in (ROOT / "pi_policy" / layer).rglob("*.py"):
            for target in pattern.findall(path.read_text()):
                if target in LAYERS and target != layer and target not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)} imports pi_policy.{target}")
    assert not offenders


def module_imports() -> dict[str, set[str]]:
    """pi_policy module -> the pi_policy modules it imports anywhere in its text (type-checking and local imports
    included): `from pi_policy.a import b` counts as importing pi_policy.a.b when that is a module."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "pi_policy").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pi_policy"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pi_policy")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circle():
    graph = module_imports()
    circles = []
    for start in graph:  # a path from a module back to itself
        seen, todo = set(), [(start, (start,))]
        while todo:
            node, path = todo.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, (*path, nxt)))
    assert not circles, circles[:5]
