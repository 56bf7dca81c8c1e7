"""README.md opens with the two commands; .ci/run runs the test command verbatim."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_main_job_then_tests():
    main_job, tests = readme_commands()
    assert "python -m experiments.main" in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    ci_lines = [l.strip() for l in open(os.path.join(ROOT, ".ci/run")) if l.strip()]
    assert ci_lines[-1] == tests, f".ci/run ends with {ci_lines[-1]!r}, README says {tests!r}"


def test_config_docstrings_give_command_runtime_and_result():
    folder = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and not name.startswith("_"):  # _*.py: shared helpers
            doc = open(os.path.join(folder, name)).read().split('"""')[1]
            assert "python -m experiments.main" in doc, name
            assert "Expected" in doc, name


def test_one_repository_url_for_setup_readme_and_every_notebook():
    """setup.py's url is the one the README names, every notebook's setup cell clones and every
    Colab badge in notebooks/README.md opens."""
    import json

    url = re.search(r'url="([^"]+)"', open(os.path.join(ROOT, "setup.py")).read()).group(1)
    assert url in open(os.path.join(ROOT, "README.md")).read()
    badges = open(os.path.join(ROOT, "notebooks", "README.md")).read()
    colab = url.replace("https://github.com/", "https://colab.research.google.com/github/")
    notebooks = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb"))
    assert notebooks
    for name in notebooks:
        cells = json.load(open(os.path.join(ROOT, "notebooks", name)))["cells"]
        setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert f'REPOSITORY, REF = "{url}", ' in setup and "git clone -q {REPOSITORY}" in setup, name
        assert f"{colab}/blob/main/notebooks/{name}" in badges, name
