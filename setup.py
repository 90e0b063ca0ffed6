"""Build hook: the recipes of configs/ ship inside the wheel as mlsteps/recipes/.

configs/ stays their only source (mlsteps.starters reads it directly in a checkout or an
editable install); everything else about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        target = Path(self.build_lib) / "mlsteps" / "recipes"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.py[co]", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithRecipes})
