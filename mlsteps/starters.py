"""The recipes that ship inside the package: the quickstart, the alignment demo and the examples.

configs/ in the repository is their only source. A wheel carries them as ``mlsteps/recipes/``
(setup.py copies configs/ there at build time); a source checkout or an editable install reads
configs/ itself. ``mlsteps init NAME`` copies one out, and a bare name that is not a file
(``mlsteps run quickstart``) runs the packaged recipe. No heavy imports.
"""

from __future__ import annotations

from pathlib import Path

from mlsteps.errors import UserError, did_you_mean

_PACKAGED = Path(__file__).resolve().parent / "recipes"
_CHECKOUT = Path(__file__).resolve().parent.parent / "configs"


def recipes_dir() -> Path | None:
    """Where the packaged recipes are: inside the installed package, else the checkout's
    configs/ (None when neither exists)."""
    for candidate in (_PACKAGED, _CHECKOUT):
        if (candidate / "quickstart.yaml").is_file():
            return candidate
    return None


def recipes() -> dict[str, Path]:
    """Packaged recipes by name: top-level ones (quickstart, alignment), then examples/."""
    root = recipes_dir()
    if root is None:
        return {}
    found = {p.stem: p for p in sorted(root.glob("*.yaml"))}
    for path in sorted((root / "examples").glob("*.yaml")):
        found.setdefault(path.stem, path)
    return found


def summary(path: Path) -> str:
    """The first line of a recipe's leading comment (what it is), or ''."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        if text:
            return text
    return ""


def _is_bare_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


def resolve(path: Path) -> Path:
    """``path`` itself when it exists or looks like a path; for a bare name that is not a file,
    the packaged recipe of that name (UserError naming the packaged ones when none)."""
    text = str(path)
    if path.exists() or not _is_bare_name(text):
        return path
    known = recipes()
    if text in known:
        return known[text]
    raise UserError(
        f"no recipe file '{text}' and no packaged recipe of that name",
        where=text,
        hint=did_you_mean(text, list(known))
        or f"give a recipe file, or one of: {', '.join(known)} (mlsteps init --list)",
    )


def init(name: str, directory: Path) -> Path:
    """Copy the packaged recipe ``name`` to ``directory/<name>.yaml``; never overwrites."""
    known = recipes()
    if name not in known:
        raise UserError(
            f"no packaged recipe '{name}'",
            where="mlsteps init",
            hint=did_you_mean(name, list(known)) or f"choose from: {', '.join(known)}",
        )
    if directory.exists() and not directory.is_dir():
        raise UserError("is not a directory", where=str(directory), hint="give a directory")
    target = directory / f"{name}.yaml"
    if target.exists() or target.is_symlink():
        raise UserError(
            "already exists; mlsteps init never overwrites a file",
            where=str(target),
            hint="remove or rename it, or give another directory",
        )
    directory.mkdir(parents=True, exist_ok=True)
    with open(target, "x", encoding="utf-8") as f:  # "x": a file created meanwhile is kept
        f.write(known[name].read_text(encoding="utf-8"))
    return target
