"""The unit files in systemd/: accepted by `systemd-analyze verify` silently, hardened, consistent.

`systemd-analyze verify` reports a misspelt key or an unparsable value only as a warning with exit
code 0, so any output at all fails these tests. It also insists that every ExecStart= binary
exists, which /opt/dgxqueue/.venv/bin/dgxqueue does not on a build machine; so the real unit files
are verified, byte for byte, inside a scratch root (``--root``) that holds systemd's own units and
an executable at each path the units name. ``User=dgxqueue`` needs no such user: verify does not
resolve users.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dgxqueue.cli import build_parser
from dgxqueue.cli.common import EX_DATAERR
from dgxqueue.config import Settings, load_settings
from dgxqueue.daemon.daemon import SHUTDOWN_DB_SECONDS
from dgxqueue.daemon.hardstop import HARD_STOP_MARGIN

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
UNIT_FILES = sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".timer"))
EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecCondition", "ExecReload", "ExecStop",
             "ExecStopPost")
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing, and CI must check the unit files")
        pytest.skip("systemd-analyze is not installed")
    return found


def _settings(unit: str) -> dict[str, list[str]]:
    """key -> values of a unit file (every section; comments dropped)."""
    values: dict[str, list[str]] = {}
    for line in (UNITS_DIR / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _executables(unit: str) -> list[str]:
    paths = []
    for key in EXEC_KEYS:
        for command in _settings(unit).get(key, []):
            paths.append(shlex.split(command)[0].lstrip("-@:+!"))
    return paths


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root with systemd's units, our units verbatim, and a stub for each executable."""
    analyze = _systemd_analyze()
    root = tmp_path_factory.mktemp("root")
    candidates = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
    system_units = next(p for p in candidates if p.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    ours = root / "etc/systemd/system"
    ours.mkdir(parents=True)
    for unit in UNIT_FILES:
        shutil.copy2(UNITS_DIR / unit, ours / unit)
        for executable in _executables(unit):
            stub = root / executable.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    assert Path(analyze).exists()
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_systemd_analyze(), "verify", f"--root={root}", "--man=no", unit],
                          capture_output=True, text=True, timeout=60, check=False)


def test_units__every_file_is_tested() -> None:
    """The worker template, migrate, prune and archive services and timers, and the status page, are all there."""
    assert set(UNIT_FILES) == {"dgxqueue-worker@.service", "dgxqueue-migrate.service",
                               "dgxqueue-prune.service", "dgxqueue-prune.timer",
                               "dgxqueue-archive.service", "dgxqueue-archive.timer", "dgxqueue-web.service"}


@pytest.mark.parametrize("unit", ["dgxqueue-worker@0.service", "dgxqueue-worker@7.service",
                                  *[u for u in UNIT_FILES if "@" not in u]])
def test_verify__accepts_unit_with_no_output_at_all(unit_root: Path, unit: str) -> None:
    """`systemd-analyze verify` exits 0 and prints nothing: no warning, no unknown key."""
    done = _verify(unit_root, unit)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_verify__harness_catches_a_bad_value(unit_root: Path, tmp_path: Path) -> None:
    """The scratch root does not hide mistakes: a bad value in a copy of the worker is reported."""
    broken = tmp_path / "root"
    shutil.copytree(unit_root, broken, symlinks=True)
    path = broken / "etc/systemd/system/dgxqueue-worker@.service"
    path.write_text(path.read_text().replace("WatchdogSec=60s", "WatchdogSec=sixty"))
    done = _verify(broken, "dgxqueue-worker@0.service")
    assert "sixty" in done.stdout + done.stderr


@pytest.mark.parametrize("unit", ["dgxqueue-worker@.service", "dgxqueue-web.service"])
def test_security__worker_exposure_is_ok(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze security --offline=yes` rates the worker's and the status page's exposure
    2.0 or below ("OK")."""
    done = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNITS_DIR / unit)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, match.group(0)
    assert match.group(2) in ("OK", "SAFE")


def test_worker__notify_watchdog_and_stop_timeout_fit_the_daemon() -> None:
    """Type=notify from the main process, a watchdog, and TimeoutStopSec above the grace period."""
    worker = _settings("dgxqueue-worker@.service")
    assert worker["Type"] == ["notify"] and worker["NotifyAccess"] == ["main"]
    assert worker["Restart"] == ["on-failure"]
    assert int(worker["WatchdogSec"][0].removesuffix("s")) >= 10
    stop_seconds = int(worker["TimeoutStopSec"][0].removesuffix("s"))
    # The longest stop: the grace period, the shutdown's database calls, then the hard stop's margin.
    assert stop_seconds > Settings().worker.grace_seconds + SHUTDOWN_DB_SECONDS + HARD_STOP_MARGIN


def test_worker__one_gpu_and_one_metrics_port_per_instance() -> None:
    """Each instance sees only its GPU, serves /metrics on its own port, and may reach /dev/nvidia*."""
    worker = _settings("dgxqueue-worker@.service")
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Environment"]
    assert "DGXQUEUE_METRICS_PORT=946%i" in worker["Environment"]
    assert worker["PrivateDevices"] == ["no"] and worker["DevicePolicy"] == ["closed"]
    assert "char-nvidia* rw" in worker["DeviceAllow"]
    assert worker["User"] == ["dgxqueue"] and worker["ProtectSystem"] == ["strict"]
    assert "/var/lib/dgxqueue" in worker["ReadWritePaths"]
    assert worker["Requires"] == ["dgxqueue-migrate.service"]
    assert "dgxqueue-migrate.service" in worker["After"][0].split()


def test_scrape_example__targets_the_ports_the_worker_units_serve() -> None:
    """The example scrape config lists, per host, the ports of workers 0, 1, ... (946<index>), so
    that none is missed and no target is a phantom that raises DgxQueueDaemonDown."""
    [port_env] = [e for e in _settings("dgxqueue-worker@.service")["Environment"] if "METRICS_PORT" in e]
    scheme = port_env.split("=", 1)[1]
    example = (REPO / "monitoring" / "prometheus" / "scrape-example.yml").read_text()
    ports: dict[str, list[str]] = {}
    for host, port in re.findall(r"^\s+- ([\w.-]+):(\d+)$", example, re.MULTILINE):
        ports.setdefault(host, []).append(port)
    assert len(ports) == 2
    for listed in ports.values():
        assert listed == [scheme.replace("%i", str(i)) for i in range(len(listed))]


@pytest.mark.parametrize("unit", [u for u in UNIT_FILES if u.endswith(".service")])
def test_units__exec_start_is_a_valid_dgxqueue_command(unit: str) -> None:
    """Each ExecStart= is a command line the dgxqueue parser accepts."""
    [command] = _settings(unit)["ExecStart"]
    argv = shlex.split(command)
    assert argv[0] == "/opt/dgxqueue/.venv/bin/dgxqueue"
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/dgxqueue/config.toml"
    expected = {"dgxqueue-worker@.service": "worker", "dgxqueue-migrate.service": "db",
                "dgxqueue-prune.service": "prune", "dgxqueue-archive.service": "archive",
                "dgxqueue-web.service": "web"}[unit]
    assert args.command == expected
    if expected == "web":  # loopback: no token needed, none to leak into the unit
        assert (args.host, args.token_file, args.read_only) == ("127.0.0.1", None, False)
    if expected in ("prune", "archive"):
        assert args.older_than == "30d"


def _as_systemd_runs_it(command: str) -> list[str]:
    """The argv systemd makes of a unit's command line: quotes removed, ``$$`` a literal ``$``.
    Faithful only without backslashes (systemd reads C escapes, inside quotes too) and ``%``
    (specifiers): asserted."""
    assert "\\" not in command and "%" not in command, command
    return [word.replace("$$", "$") for word in shlex.split(command)]


def test_prune_unit__vacuums_after_a_large_prune() -> None:
    """The prune service gives the space back afterwards: `db vacuum` with a free-page threshold
    (a plain number: '%' is a specifier in unit files), as ExecStopPost=, which runs after a
    failed ExecStart= too (ExecStartPost= is skipped then: after every prune that kept a held
    job, exit 65). Its time is not limited, as ExecStartPost='s was not (Type=oneshot): stop-post
    commands run under TimeoutStopSec=, 90 s by default, too short for a VACUUM of a large file.
    Exit 65 still fails the unit (no SuccessExitStatus=), so the operator sees it."""
    unit = _settings("dgxqueue-prune.service")
    assert "ExecStartPost" not in unit
    [command] = unit["ExecStopPost"]
    shell, flag, script = _as_systemd_runs_it(command)
    assert (shell, flag) == ("/bin/sh", "-c")
    [vacuum] = re.findall(r"exec (/opt/dgxqueue/\S+ [^;]*);;", script)
    argv = shlex.split(vacuum)
    assert argv[0] == "/opt/dgxqueue/.venv/bin/dgxqueue"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.db_command, args.min_free) == ("db", "vacuum", "0.2")
    assert args.config == "/etc/dgxqueue/config.toml"
    assert unit["TimeoutStopSec"] == ["infinity"]
    assert "SuccessExitStatus" not in unit


@pytest.mark.parametrize(("result", "code", "status", "vacuums"), [
    ("success", "exited", "0", True),
    ("exit-code", "exited", str(EX_DATAERR), True),  # a held job's row kept, the rest pruned
    ("exit-code", "exited", "1", False),
    ("exit-code", "exited", "6", False),
    ("exit-code", "exited", "69", False),  # the database unreachable
    ("exit-code", "exited", "70", False),
    ("exit-code", "exited", "165", False),
    ("signal", "killed", "TERM", False),
    ("core-dump", "dumped", "ABRT", False),
    ("start-limit-hit", None, None, False),  # the prune never ran
])
def test_prune_unit__vacuums_after_a_prune_that_exited_0_or_65_only(tmp_path: Path, result: str, code: str | None,
                                                                   status: str | None, vacuums: bool) -> None:
    """The unit's ExecStopPost= as systemd runs it (its argv, a real /bin/sh, the environment
    systemd gives stop-post commands: $SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS, see
    systemd.exec(5)), with a stub at dgxqueue's path: the vacuum runs after the prune exited 0
    or 65, and its exit is the shell's (a failed vacuum fails the unit, as it did); after any
    other end of the prune it is skipped and the shell exits 0 (the unit fails on the prune's
    exit alone)."""
    calls = tmp_path / "calls"
    stub = tmp_path / "dgxqueue"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {shlex.quote(str(calls))}\nexit 3\n')
    stub.chmod(0o755)
    [command] = _settings("dgxqueue-prune.service")["ExecStopPost"]
    argv = [word.replace("/opt/dgxqueue/.venv/bin/dgxqueue", str(stub)) for word in _as_systemd_runs_it(command)]
    env = {"PATH": "/usr/bin:/bin", "SERVICE_RESULT": result}
    if code is not None and status is not None:
        env.update(EXIT_CODE=code, EXIT_STATUS=status)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.stderr == ""
    if vacuums:
        assert done.returncode == 3
        args = build_parser().parse_args(calls.read_text().splitlines())
        assert (args.command, args.db_command, args.min_free) == ("db", "vacuum", "0.2")
    else:
        assert done.returncode == 0 and not calls.exists()


def test_env_example__only_comments_and_assignments() -> None:
    """The EnvironmentFile example parses: prose comments, and VAR=value lines (active or '#VAR=')."""
    assignments: list[str] = []
    values: dict[str, str] = {}
    for line in (UNITS_DIR / "dgxqueue.env.example").read_text().splitlines():
        if not line.strip() or line.startswith("# "):
            continue
        body = line.removeprefix("#")
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", body), line
        name, _, value = body.partition("=")
        assignments.append(name)
        values[name] = value
    assert "DATABASE_URL" in assignments
    load_settings(env={k: v for k, v in values.items() if k.startswith(("DGXQUEUE_", "DATABASE_URL"))})
    assert not {"CUDA_VISIBLE_DEVICES", "DGXQUEUE_METRICS_PORT"} & set(assignments)


def test_worker__restarts_after_machine_fault_and_time_limit_exits_paced() -> None:
    """Exit codes 75 (machine fault) and 124 (a stuck backend call) restart the daemon, not 78;
    restarts are at least 10 s apart so a sick machine is no hot loop, and no start limit stops them."""
    from dgxqueue.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT

    worker = _settings("dgxqueue-worker@.service")
    prevented = {int(code) for value in worker["RestartPreventExitStatus"] for code in value.split()}
    assert prevented == {78} and not {EXIT_MACHINE_FAULT, EXIT_JOB_TIMEOUT} & prevented
    assert int(worker["RestartSec"][0].removesuffix("s")) >= 10
    assert worker["StartLimitIntervalSec"] == ["0"]
