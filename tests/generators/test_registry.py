"""Finding a backend by name: what a wrong ``module:attr`` or an incomplete backend is told.

Backends here are real modules written to a temporary folder and imported from ``sys.path`` (or,
for the subprocess tests, from ``PYTHONPATH``); entry points are real ``.dist-info`` folders.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.errors import ConfigError, UnknownGeneratorError
from dgxqueue.generators import (
    PROTOCOL_ATTRIBUTES,
    PROTOCOL_METHODS,
    Generator,
    create_generator,
    protocol_problems,
)
from workers.silence import SilenceGenerator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"

COMPLETE = """
    class Backend:
        name = "custom"
        models = frozenset({"custom"})
        max_batch_size = 4

        def load(self): pass
        def validate(self, request): pass
        def batch_key(self, request): return 0
        def generate(self, requests): return []
"""
# Lacks validate and batch_key, which the daemon only calls once jobs are claimed.
PARTIAL = """
    class Backend:
        name = "partial"
        models = frozenset({"partial"})
        max_batch_size = 4

        def load(self): pass
        def generate(self, requests): return []
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder on ``sys.path`` and a module name unique to the test (imports are cached)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"dgxq_backend_{uuid.uuid4().hex[:8]}"
    yield tmp_path, name
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]


def _write(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def test_protocol_members__are_the_protocols_members() -> None:
    """The members create_generator checks are exactly those the Generator protocol declares."""
    declared = set(Generator.__annotations__) | {
        name for name, value in vars(Generator).items() if callable(value) and not name.startswith("_")
    }
    assert set(PROTOCOL_ATTRIBUTES) | set(PROTOCOL_METHODS) == declared


def test_create_generator__module_attr_on_sys_path_is_built(module: tuple[Path, str]) -> None:
    """A complete backend named by module:attr is imported and built with its options."""
    folder, name = module
    _write(folder, name, COMPLETE)
    generator = create_generator(f"{name}:Backend")
    assert type(generator).__name__ == "Backend" and generator.models == frozenset({"custom"})


def test_create_generator__names_every_missing_member(module: tuple[Path, str]) -> None:
    """A backend without validate and batch_key is refused at creation, naming both."""
    folder, name = module
    _write(folder, name, PARTIAL)
    with pytest.raises(ConfigError, match=r"Backend it built lacks validate, batch_key") as caught:
        create_generator(f"{name}:Backend")
    assert caught.value.key == "generator.name"


def test_create_generator__names_members_of_the_wrong_kind(module: tuple[Path, str]) -> None:
    """Members present but unusable (a str for models, 0 for max_batch_size, data for a method) are named."""
    folder, name = module
    _write(folder, name, COMPLETE.replace('frozenset({"custom"})', '"custom"')
           .replace("max_batch_size = 4", "max_batch_size = 0") + "        load = None\n")
    with pytest.raises(ConfigError) as caught:
        create_generator(f"{name}:Backend")
    message = str(caught.value)
    for phrase in ("load is not callable", "models='custom' is not a set of model names",
                   "max_batch_size=0 is not an integer >= 1"):
        assert phrase in message


def test_create_generator__an_attribute_that_is_not_callable(module: tuple[Path, str]) -> None:
    """module:attr naming a plain value says it is not a factory."""
    folder, name = module
    _write(folder, name, "BACKEND = 3\n")
    with pytest.raises(ConfigError, match="a class or function that builds a Generator, not a value of type int"):
        create_generator(f"{name}:BACKEND")


def test_create_generator__module_not_found_names_it_and_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module nobody can import is named, with the PYTHONPATH searched and the registered names."""
    monkeypatch.setenv("PYTHONPATH", "/opt/backends")
    with pytest.raises(UnknownGeneratorError) as caught:
        create_generator("no_such_backend_pkg.render:Gen")
    message = str(caught.value)
    assert "module 'no_such_backend_pkg.render' not found (no 'no_such_backend_pkg')" in message
    assert "PYTHONPATH (now /opt/backends)" in message and "musicgen, silence, synth" in message


def test_create_generator__missing_attribute_lists_what_the_module_has(module: tuple[Path, str]) -> None:
    """An attribute the module lacks is named, with the module's public names."""
    folder, name = module
    _write(folder, name, COMPLETE)
    with pytest.raises(UnknownGeneratorError, match=rf"'{name}' has no attribute 'Backnd'; it has: Backend"):
        create_generator(f"{name}:Backnd")


def test_create_generator__module_whose_import_fails_says_why(module: tuple[Path, str]) -> None:
    """A module found but failing to import (a missing dependency, an exception) is not 'not found'."""
    folder, name = module
    _write(folder, name, "import dgxq_missing_dependency\n")
    with pytest.raises(UnknownGeneratorError, match=rf"importing module '{name}' failed: No module named "
                                                    "'dgxq_missing_dependency'"):
        create_generator(f"{name}:Backend")
    _write(folder, f"{name}_raises", "raise RuntimeError('no GPU driver')\n")
    with pytest.raises(UnknownGeneratorError, match="failed: RuntimeError: no GPU driver"):
        create_generator(f"{name}_raises:Backend")
    sys.modules.pop(f"{name}_raises", None)


@pytest.mark.parametrize("path", ["module_only:", ":Attr"])
def test_create_generator__half_a_path_is_refused(path: str) -> None:
    """A module:attr path missing either part says both are needed."""
    with pytest.raises(UnknownGeneratorError, match="both parts are needed"):
        create_generator(path)


def test_create_generator__incomplete_entry_point_backend_is_named(module: tuple[Path, str]) -> None:
    """A backend registered in the dgxqueue.generators group that lacks members names them and its entry point."""
    folder, name = module
    _write(folder, name, PARTIAL)
    dist = folder / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[dgxqueue.generators]\n{name} = {name}:Backend\n{name}-gone = {name}_gone:Backend\n")
    with pytest.raises(ConfigError, match="lacks validate, batch_key"):
        create_generator(name)
    with pytest.raises(UnknownGeneratorError, match=rf"entry point dgxqueue.generators {name}-gone = "
                                                    rf"{name}_gone:Backend\): module '{name}_gone' not found"):
        create_generator(f"{name}-gone")


def test_protocol_problems__none_for_a_builtin_backend() -> None:
    """A backend from workers/ passes the check."""
    assert protocol_problems(SilenceGenerator()) == []


def _config_check(generator: str, pythonpath: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``dgxqueue config check`` as a subprocess, importing backends from ``pythonpath``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    env |= {"PYTHONPATH": os.pathsep.join([str(pythonpath), str(REPO)]), "DGXQUEUE_GENERATOR_NAME": generator,
            "DATABASE_URL": f"sqlite:///{tmp_path}/generations.db"}
    return subprocess.run([sys.executable, "-m", "dgxqueue", "config", "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_config_check__module_attr_backend_found_on_pythonpath(tmp_path: Path) -> None:
    """config check builds the documented example backend from PYTHONPATH; an incomplete one exits 78 naming
    what it lacks, in one line."""
    done = _config_check("tone:ToneGenerator", EXAMPLES, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generator tone:ToneGenerator" in done.stdout
    backends = tmp_path / "backends"
    backends.mkdir()
    (backends / "partial_backend.py").write_text(textwrap.dedent(PARTIAL))
    done = _config_check("partial_backend:Backend", backends, tmp_path)
    assert done.returncode == 78
    assert re.fullmatch(r"dgxqueue: error: config generator.name='partial_backend:Backend' is invalid: .*"
                        r"Backend it built lacks validate, batch_key\n", done.stderr)
    done = _config_check("tone:Tone", EXAMPLES, tmp_path)
    assert done.returncode == 78 and "'tone' has no attribute 'Tone'; it has: " in done.stderr


def test_readme__shows_the_example_backend_verbatim() -> None:
    """The README's generator example is docs/examples/tone.py, which the test above runs."""
    example = (EXAMPLES / "tone.py").read_text()
    assert example in (REPO / "README.md").read_text()
