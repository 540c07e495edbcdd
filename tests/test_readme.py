"""The README's quick start is what CI runs, and it names real modules and config files."""
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(marker: str) -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    m = re.search(rf"<!-- quickstart:{marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README.md lacks the quickstart:{marker} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert "quickstart:test" in ci and 'bash -c "$cmd"' in ci
    # .ci/run's own extraction gives the same command as the README block.
    extracted = subprocess.run(
        ["python3", "-c", ci.split("cmd=$(python3 - <<'PY'\n")[1].split("\nPY\n")[0]],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == _block("test")
    assert "pip install -e '.[test]'" in extracted and "python -m pytest" in extracted


def test_demo_command_installs_and_runs_the_demo():
    demo = _block("demo")
    assert "pip install -e ." in demo and "python -m stablerep_jax.demo" in demo


def test_readme_commands_name_existing_modules_and_configs():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for module in set(re.findall(r"python -m stablerep_jax\.(\w+)", text)):
        path = os.path.join(REPO, "stablerep_jax", module)
        assert (os.path.exists(path + ".py")
                or os.path.exists(os.path.join(path, "__main__.py"))), module
    for config in set(re.findall(r"configs/(\w+\.py)", text)):
        assert os.path.exists(os.path.join(REPO, "configs", config)), config


def test_readme_is_short():
    """A README for users; measurements and their history live in benchmarks/RESULTS.md."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines (at most 260)"


def test_readme_names_existing_benchmarks():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"benchmarks/(\w+\.py)", text))
    assert named, "README.md names no benchmark script"
    for script in named:
        assert os.path.exists(os.path.join(REPO, "benchmarks", script)), script
    assert "benchmarks/RESULTS.md" in text
    assert os.path.exists(os.path.join(REPO, "benchmarks", "RESULTS.md"))
