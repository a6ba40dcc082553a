"""The README's two commands exist, and CI runs exactly the README's test command."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_commands():
    text = (REPO / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    main, tests = _readme_commands()
    assert "scripts/fit.py experiment=imgx_brats data=brats_synthetic scale=tiny" in main
    assert "pip install -e ." in main and tests.endswith("python -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be the one .ci/run executes"


def test_every_experiment_named_in_readme_exists():
    text = (REPO / "README.md").read_text()
    names = text.split("- Experiments:", 1)[1].split("(see", 1)[0]
    for name in [n.strip(" `\n,") for n in names.split(",")]:
        assert (REPO / "experiments" / "experiment" / f"{name}.yaml").is_file(), name


def test_environment_yml_installs_the_torch_the_readme_pins():
    """environment.yml (the conda route) takes torch from pip at the README's pinned version, not from the
    pytorch/nvidia conda channels (which stopped publishing new versions after 2.5)."""
    import re

    import yaml

    pins = set(re.findall(r"pip install torch==([\w.+]+)", (REPO / "README.md").read_text()))
    assert len(pins) == 1, f"the README pins torch once, found {pins}"
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert not {"pytorch", "nvidia"} & set(env.get("channels", []))
    assert not [d for d in conda if re.match(r"(pytorch|torch)\b", d)], conda
    assert [p for p in pip if re.match(r"torch\b", p)] == [f"torch=={pins.pop()}"], pip
    assert "-e .[dev]" in pip
