"""The `curvwatch` command and the README's first run: set-up commands, demo, report, extras."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
import torch

from curvwatch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install torch==2\.13\.0 && ")


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# -- the README's set-up commands -------------------------------------------------
def test_readme_opens_with_two_set_up_commands_each_in_its_own_venv():
    lines = _readme().splitlines()
    assert lines[0] == "# curvwatch"
    block = lines[lines.index("```bash") + 1:]
    commands = block[:block.index("```")]
    assert lines.index("```bash") <= 2  # the first thing after the title
    assert len(commands) == 2
    demo, tests = commands
    assert SETUP.match(demo) and demo.endswith('pip install -e ".[demo]" && curvwatch demo')
    assert SETUP.match(tests) and tests.endswith('pip install -e ".[dev]" && python -m pytest -q tests')


def test_ci_runs_the_readmes_second_command_as_written():
    readme_command = [line for line in _readme().splitlines() if line.startswith("python3 -m venv")][1]
    shown = subprocess.run(["bash", ".ci/run", "--print"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=60)
    assert shown.stdout.strip() == readme_command
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    # the venv is the README command's own: the script makes and activates none
    assert not re.search(r"^\s*(python3? -m venv|source |\. \S*activate)", script, re.M)


def test_readme_and_help_state_the_same_measured_demo_time(capsys):
    readme = _readme()
    paragraph = readme.split("```", 2)[2].strip().split("\n\n")[0]
    assert cli.DEMO_TIME in paragraph
    assert "about ten seconds" not in readme and "about a minute" not in readme
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert cli.DEMO_TIME in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert cli.DEMO_TIME in " ".join(capsys.readouterr().out.split())


def test_readme_says_how_to_get_the_cpu_build_of_torch():
    paragraph = _readme().split("```", 2)[2].strip().split("\n\n")[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in paragraph
    assert "CUDA" in paragraph


# -- extras ----------------------------------------------------------------------
def test_huggingface_extra_can_run_the_trainer():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    names = [re.split(r"[<>=\[ ]", d)[0] for d in extras["huggingface"]]
    assert "transformers" in names and "accelerate" in names  # Trainer(...) imports accelerate


@pytest.mark.parametrize("missing", ["matplotlib", "sklearn", "tensorboard"])
def test_demo_without_the_demo_extra_names_the_extra(tmp_path, missing):
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from curvwatch.cli import main\n"
            f"sys.exit(main(['demo', '--out', {str(tmp_path / 'out')!r}, '--no-progress']))")
    done = _run_python(code, tmp_path)
    assert done.returncode == cli.EXIT_MISSING_EXTRA, done.stderr
    assert 'pip install "curvwatch[demo]"' in done.stderr
    assert {"sklearn": "scikit-learn"}.get(missing, missing) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # stopped before training


def test_report_without_matplotlib_or_tensorboard_names_the_extra(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("curvature/lambda_max", 1.0, 1)
    writer.close()
    for missing in ("matplotlib", "tensorboard"):
        code = (f"import sys; sys.modules[{missing!r}] = None\n"
                "from curvwatch.cli import main\n"
                f"sys.exit(main(['report', {str(tmp_path / 'run')!r}]))")
        done = _run_python(code, tmp_path)
        assert done.returncode == cli.EXIT_MISSING_EXTRA, done.stderr
        assert 'pip install "curvwatch[demo]"' in done.stderr and missing in done.stderr
        assert "Traceback" not in done.stderr


# -- demo and report end to end ------------------------------------------------------
def test_demo_runs_are_named_by_optimizer_and_report_finds_both(tmp_path, capsys):
    from curvwatch.report import find_runs, read_run

    out = str(tmp_path / "curvwatch_demo")
    try:
        assert cli.main(["demo", "--out", out, "--steps", "20", "--every", "10", "--no-progress",
                         "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert cli.main(["demo", "--out", out, "--steps", "20", "--every", "10", "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out}" in printed
    assert os.path.isfile(os.path.join(out, "gd", "curvwatch_report.png"))
    assert list(find_runs(out)) == ["gd"]  # a TensorBoard run named gd, not "."
    # a rerun replaces the run: every step once
    assert [s for s, _ in read_run(out)["curvature/lambda_max"]] == [10, 20]
    assert len([f for f in os.listdir(os.path.join(out, "gd")) if f.startswith("events.out")]) == 1

    assert cli.main(["demo", "--out", out, "--optimizer", "adam", "--steps", "20", "--no-progress"]) == 0
    assert list(find_runs(out)) == ["adam", "gd"]
    capsys.readouterr()
    assert cli.main(["report", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"found 2 runs with curvature/* tags under {out}: adam, gd"
    assert printed[-1] == os.path.join(out, "curvwatch_report.png")
    with open(printed[-1], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no TensorBoard event files or .jsonl files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--threads", "0"])
