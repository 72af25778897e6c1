"""README's two commands stay in sync with what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    install_and_compile, install_and_test = blocks[0], blocks[1]
    assert "fastertrt compile minilm" in install_and_compile and "fastertrt run" in install_and_compile
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_every_source_folder_is_a_listed_package():
    """An unlisted subpackage works in a dev checkout but is missing from a fresh install."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for pkg, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                assert ".".join((pkg, *rel)) in listed, f"{init.parent} is not in pyproject's packages"
