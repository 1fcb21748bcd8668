"""CPU threads: the default that stays fast when other programs share the cores, the --threads flag and `threads`
parameter that override it, the runner that applies it, and the start-up lines that say it."""

import argparse

import pytest
import torch

from pi_policy.node.params import ParamError, params_from_dict
from pi_policy.runtime import build_runner, threads
from pi_policy.runtime.spec import RunnerSpec, SpecError
from pi_policy.tools.cli import main
from pi_policy.tools.flags import add_model_arguments, spec_from_args


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (4, 1), (8, 2), (12, 3), (16, 4), (128, 4)])
def test_the_default_leaves_most_cores_to_the_rest_of_the_machine(monkeypatch, cores, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    assert threads.resolve_threads(0) == expected
    assert threads.resolve_threads(3) == 3  # asked for: as asked


def test_the_runner_computes_with_the_threads_it_was_given(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    torch.set_num_threads(3)
    runner = build_runner(RunnerSpec(warmup=False, progress=False))
    assert runner.threads == torch.get_num_threads() == 2  # auto on 8 cores
    runner = build_runner(RunnerSpec(threads=1, warmup=False, progress=False))
    assert runner.threads == torch.get_num_threads() == 1


def test_flag_and_parameter_set_the_same_field():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert spec_from_args(parser.parse_args(["--threads", "2"])).threads == 2
    assert spec_from_args(parser.parse_args([])).threads == 0
    params = params_from_dict({"preset": "tiny", "joint_names": ["a"], "threads": 2})
    assert params.runner_spec().threads == 2
    with pytest.raises(ParamError, match="threads must be a whole number >= 0, got -1"):
        params_from_dict({"preset": "tiny", "joint_names": ["a"], "threads": -1})
    with pytest.raises(SpecError, match="threads"):
        RunnerSpec(threads=-2).validate()


def test_the_demo_says_how_many_threads_it_runs(tmp_path, capsys):
    assert main(["demo", "--iters", "2", "--no-bag", "--threads", "1", "--no-progress"]) == 0
    assert "on cpu, 1 CPU thread; start-up" in capsys.readouterr().out
