"""The GPU measurement scripts (scripts/*.sh) ask for flags that exist: a misspelt flag would only show on the GPU
machine, after minutes of start-up. Every `pi-policy` command in them is parsed by the CLI's own parser, and
every flag given to a Python script is one that script's --help lists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pi_policy.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SHELL_WORDS = {"timeout", "do", "then", "else"}


def commands(path: Path) -> list[list[str]]:
    """Each command line of the script that runs pi-policy or a Python script, shell variables filled in."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    text = "\n".join(line for line in text.splitlines() if '"$@"' not in line)  # a function's own body
    text = re.sub(r"\$\{?\w+\}?", "1", text)  # "$out/x.json" -> "1/x.json", "$batch" -> "1"
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        for part in re.split(r";|\|\||&&", line):
            words = shlex.split(part.split(" 2>&1")[0].split(" | ")[0])
            while words and (words[0] in SHELL_WORDS or words[0].isdigit()):
                words = words[1:]
            if words[:1] == ["bench"] and len(words) > 1:  # the scripts' bench function: NAME, then bench arguments
                found.append(["pi-policy", "bench", "--json", "x.json", *words[2:]])
            elif words[:3] == ["python", "-m", "pi_policy"]:
                found.append(["pi-policy", *words[3:]])
            elif words[:1] == ["python"] and len(words) > 1 and words[1].startswith("scripts/"):
                found.append(words[1:])
    return found


def test_the_scripts_are_found():
    assert any(p.name == "gpu_bench.sh" for p in SCRIPTS)
    cmds = commands(ROOT / "scripts" / "gpu_bench.sh")
    assert sum(c[:2] == ["pi-policy", "bench"] for c in cmds) >= 10
    assert any(c[0] == "scripts/fleet_load.py" for c in cmds) and any(c[:2] == ["pi-policy", "verify"] for c in cmds)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_pi_policy_command_parses(script):
    parser = build_parser()
    for cmd in commands(script):
        if cmd[0] != "pi-policy":
            continue
        try:
            parser.parse_args(cmd[1:])
        except SystemExit:
            pytest.fail(f"{script.name}: {shlex.join(cmd)} does not parse")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_python_script_flag_exists(script):
    helps: dict[str, str] = {}
    for cmd in commands(script):
        if cmd[0] == "pi-policy":
            continue
        if cmd[0] not in helps:
            done = subprocess.run([sys.executable, cmd[0], "--help"], capture_output=True, text=True, cwd=ROOT,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
            helps[cmd[0]] = done.stdout
        unknown = [w for w in cmd[1:] if w.startswith("--") and not re.search(rf"{re.escape(w)}\b", helps[cmd[0]])]
        assert not unknown, f"{script.name}: {shlex.join(cmd)}: {cmd[0]} has no {unknown}"
