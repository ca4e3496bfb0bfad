"""What `pip install dgxqueue` gets: the wheel holds the importable code and its migrations, nothing else.

Both ways a wheel is made are built for real with ``python -m build``: from the source tree (what
``pip install .`` does) and from the sdist (what an install from an index does).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: A few files each shipped package must carry; every registered generator's module among them.
EXPECTED = [
    "dgxqueue/__init__.py",
    "dgxqueue/py.typed",
    "dgxqueue/storage/queue.py",
    "dgxqueue/daemon/daemon.py",
    "dgxqueue/_alembic/env.py",
    "dgxqueue/_alembic/alembic.ini",
    "dgxqueue/_alembic/versions/001_initial_schema.py",
    "dgxqueue/web/app.py",  # the status page: its templates and static files are not Python
    "dgxqueue/web/templates/overview.html",
    "dgxqueue/web/static/app.js",
    "workers/__init__.py",
    "workers/synth.py",
    "workers/musicgen.py",
    "workers/silence.py",
]


def _build(outdir: Path, *flags: str) -> None:
    result = subprocess.run([sys.executable, "-m", "build", *flags, "--outdir", str(outdir), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _wheel_files(outdir: Path) -> list[str]:
    [wheel] = outdir.glob("dgxqueue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder with the sdist and the wheel built from it, folder with the wheel built from the tree)."""
    from_sdist, from_tree = tmp_path_factory.mktemp("from-sdist"), tmp_path_factory.mktemp("from-tree")
    _build(from_sdist)
    _build(from_tree, "--wheel")
    return from_sdist, from_tree


@pytest.mark.parametrize("source", ["sdist", "tree"])
def test_wheel__holds_dgxqueue_workers_and_migrations_only(built: tuple[Path, Path], source: str) -> None:
    """The wheel has dgxqueue with its migrations and every generator module in workers/, and no
    tests, benchmarks or other top-level folder."""
    files = _wheel_files(built[0] if source == "sdist" else built[1])
    missing = [name for name in EXPECTED if name not in files]
    assert not missing, f"missing from the wheel: {missing}"
    assert any(name.startswith("dgxqueue/_alembic/versions/0") for name in files)
    top = {name.split("/", 1)[0] for name in files}
    metadata = {t for t in top if t.endswith(".dist-info")}
    assert len(metadata) == 1 and top - metadata == {"dgxqueue", "workers"}, top
    assert not [name for name in files if name.startswith(("tests/", "benchmarks/"))]


def test_wheel__registers_every_generator_in_workers(built: tuple[Path, Path]) -> None:
    """Each generator entry point names a module the wheel carries."""
    [wheel] = built[1].glob("dgxqueue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [points] = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(points).decode()
        files = archive.namelist()
    section = text.split("[dgxqueue.generators]", 1)[1].split("[", 1)[0]
    targets = [line.split("=", 1)[1].strip() for line in section.splitlines() if "=" in line]
    assert len(targets) >= 3, text
    for target in targets:
        assert target.split(":", 1)[0].replace(".", "/") + ".py" in files, target


def test_sdist__carries_what_the_wheel_is_built_from(built: tuple[Path, Path]) -> None:
    """The sdist holds the sources of both packages, the top-level migrations and the project file."""
    [sdist] = built[0].glob("dgxqueue-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in ("pyproject.toml", "alembic.ini", "alembic/env.py", "alembic/versions/001_initial_schema.py",
                 "dgxqueue/__init__.py", "workers/synth.py"):
        assert name in names, name
