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


NUMBERS = re.compile(r"<!-- numbers: (\S+) -->")
TOKEN = re.compile(r"\d[\d,]*(?:\.\d+)?%?")
SCALES = (1, 100, 1e-6, 1e-9, 1e-12)  # as stored, percent, M / G / T (FLOPs)


def _stored_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _stored_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _stored_numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _written_as(token: str, value: float) -> bool:
    digits = token.rstrip("%").replace(",", "")
    decimals = len(digits.partition(".")[2])
    scales = (100,) if token.endswith("%") else SCALES
    return any(f"{abs(value) * s:.{decimals}f}" == digits for s in scales)  # signs stand outside tokens


def test_result_rows_are_the_numbers_in_their_results_files():
    """A table row marked `<!-- numbers: PATH -->` (README.md, docs/*.md; PATH relative to the
    page; several markers: their union) shows only numbers that its results files hold, at the
    precision shown: figures are copied from what a run wrote, not typed in."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    import json

    checked = 0
    for page in pages:
        for line in open(page):
            sources = NUMBERS.findall(line)
            if not (sources and line.startswith("|")):
                continue
            stored = [x for source in sources for x in _stored_numbers(
                json.load(open(os.path.join(os.path.dirname(page), source))))]
            for token in TOKEN.findall("|".join(line.split("|")[2:])):
                assert any(_written_as(token, x) for x in stored), (page, sources, token, line)
            checked += 1
    assert checked >= 3
