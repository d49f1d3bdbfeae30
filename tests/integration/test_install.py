"""The production install of README "Running under systemd", done in a temporary root:
a venv at /opt/mailgw with the package, the files the package ships, sysusers and
tmpfiles, `systemd-analyze verify` on the unit and `mailgw check` on the shipped config,
run as the README runs it: `runuser -u mailgw` (as root, with util-linux's runuser and
unshare: the mailgw user sysusers made in the temporary root is shown to runuser through a
private mount namespace whose /etc/passwd and /etc/group add it to the host's, so the host
gets no user)."""

from __future__ import annotations

import os
import re
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
#: what the unit runs and the README installs (one path, written once)
VENV = "/opt/mailgw"
CONFIG = "/etc/mailgw/gateway.yaml"
SHIPPED = ("README.md", "gateway.example.yaml", "systemd/mailgw.service", "systemd/mailgw.sysusers",
           "systemd/mailgw.tmpfiles", "systemd/gateway.yaml", "policies/20-signature.yaml",
           "policies/templates/signature.txt")


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command as the admin would: outside this checkout, no PYTHONPATH into it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                         env=env, cwd="/")  # not this checkout: python -c puts the cwd first
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out


def test_unit_names_the_documented_paths() -> None:
    unit = (ROOT / "systemd/mailgw.service").read_text()
    assert f"ExecStart={VENV}/bin/mailgw run -c {CONFIG}\n" in unit
    assert f"ExecStartPre={VENV}/bin/mailgw check -c {CONFIG}\n" in unit
    assert not re.search(r"^LoadCredential=", unit, re.M)   # nothing names files no step creates
    cfg = yaml.safe_load((ROOT / "systemd/gateway.yaml").read_text())
    assert cfg["state_dir"] == "/var/lib/mailgw"
    tmpfiles = (ROOT / "systemd/mailgw.tmpfiles").read_text()
    assert "d /var/lib/mailgw 0750 mailgw mailgw -" in tmpfiles
    readme = (ROOT / "README.md").read_text()
    for step in ("apt-get install python3-venv", f"python3 -m venv {VENV}",
                 f"{VENV}/bin/pip install .", "systemd-analyze verify /etc/systemd/system/mailgw.service",
                 f"{VENV}/bin/mailgw check -c {CONFIG}"):
        assert step in readme, step


@pytest.fixture
def install_root() -> Iterator[Path]:
    """An empty directory the mailgw user can reach (pytest's tmp_path is 0700 root's)."""
    root = Path(tempfile.mkdtemp(prefix="mailgw-install-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def with_user(etc: Path, name: str, out: Path) -> None:
    """/etc/passwd and /etc/group of the host plus `name`'s lines from the root's `etc`,
    written under `out` (for the private mount namespace of `as_mailgw`)."""
    out.mkdir(parents=True, exist_ok=True)
    for db in ("passwd", "group"):
        ours = [line for line in (etc / db).read_text().splitlines()
                if line.startswith(f"{name}:")]
        host = [line for line in Path(f"/etc/{db}").read_text().splitlines()
                if not line.startswith(f"{name}:")]
        assert ours, f"no {name} in the root's {db}"
        (out / db).write_text("\n".join([*host, *ours]) + "\n")


def others_reach(path: Path) -> bool:
    """Whether a user other than root can reach `path` (every directory above it searchable)."""
    path = path.resolve()
    return all(stat.S_IMODE(d.stat().st_mode) & stat.S_IXOTH for d in path.parents)


def as_mailgw(databases: Path, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """`runuser -u mailgw -- CMD` (README), with `databases`' passwd and group bind-mounted
    over the host's in a mount namespace of its own (the host's files stay as they are)."""
    runuser, unshare = shutil.which("runuser"), shutil.which("unshare")
    assert runuser and unshare
    script = ('mount --bind "$1/passwd" /etc/passwd && mount --bind "$1/group" /etc/group '
              '&& shift && exec "$@"')
    return run(unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
               databases, runuser, "-u", "mailgw", "--", *cmd)


@pytest.mark.integration
def test_install_into_a_root_passes_verify_and_check(tmp_path: Path, install_root: Path) -> None:
    analyze = require_tool("systemd-analyze")
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    src = tmp_path / "src"   # a clean copy: setuptools builds in the source tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "var", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv", "tests",
        "bench"))
    root = install_root
    venv = root / VENV.lstrip("/")
    run(sys.executable, "-m", "venv", venv)
    # The host's site-packages stand in for the dependencies the README's pip would fetch:
    # as plain sys.path entries after the venv's own, so their .pth files (an editable
    # install of this checkout among them) do not run and the venv's mailgw is the one used.
    pure = run(venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    (Path(pure.stdout.strip()) / "zz_host_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in site.getsitepackages()))
    run(venv / "bin/pip", "install", "-q", "--no-deps", "--disable-pip-version-check", src)
    where = run(venv / "bin/python", "-c", "import gateway; print(gateway.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout
    share = venv / "share/mailgw"
    for name in SHIPPED:
        assert (share / name).is_file(), f"the package does not ship {name}"

    # the README's steps, with --root
    etc = root / "etc"
    for d in ("systemd/system", "sysusers.d", "tmpfiles.d", "mailgw"):
        (etc / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(share / "systemd/mailgw.service", etc / "systemd/system/mailgw.service")
    shutil.copy(share / "systemd/mailgw.sysusers", etc / "sysusers.d/mailgw.conf")
    shutil.copy(share / "systemd/mailgw.tmpfiles", etc / "tmpfiles.d/mailgw.conf")
    config = etc / "mailgw/gateway.yaml"
    shutil.copy(share / "systemd/gateway.yaml", config)
    config.chmod(0o640)
    as_root = os.geteuid() == 0
    if as_root:   # sysusers and tmpfiles chown: only root can
        run(sysusers, f"--root={root}", etc / "sysusers.d/mailgw.conf")
        passwd = (etc / "passwd").read_text()
        uid = int(re.search(r"^mailgw:x:(\d+):", passwd, re.M).group(1))  # type: ignore[union-attr]
        gid = int(re.search(r"^mailgw:x:(\d+):", (etc / "group").read_text(),
                            re.M).group(1))  # type: ignore[union-attr]
        os.chown(config, 0, gid)    # install -m 0640 -g mailgw
        run(tmpfiles, f"--root={root}", "--create", etc / "tmpfiles.d/mailgw.conf")
        state = root / "var/lib/mailgw"
        assert stat.S_IMODE(state.stat().st_mode) == 0o750 and state.stat().st_uid == uid
        secrets = etc / "mailgw/secrets"
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o750 and secrets.stat().st_uid == 0

    # what verify needs from the OS: the units the service orders against, and /bin/kill
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")
    out = run(analyze, "verify", f"--root={root}", "--man=no", "--generators=no", "mailgw.service")
    assert "mailgw.service" not in out.stderr, out.stderr   # no complaint about our unit

    # the installed mailgw accepts the shipped production config as it is, run as the README
    # runs it: as the mailgw user (it reads the 0640 root:mailgw config, runs the venv)
    # (the venv's python must be reachable for that: Debian's /usr/bin/python3 is; a test
    # interpreter under /root, e.g. pyenv's, is not, and then check runs as root)
    if as_root and shutil.which("runuser") and shutil.which("unshare"):
        with_user(etc, "mailgw", tmp_path / "nss")
        who = as_mailgw(tmp_path / "nss", "id", "-un")
        assert who.stdout.strip() == "mailgw"
        as_mailgw(tmp_path / "nss", "head", "-c", "1", config)   # 0640 root:mailgw: readable
        reachable = all(others_reach(Path(p)) for p in
                        [sys.executable, *site.getsitepackages()] if Path(p).exists())
        if reachable:
            check = as_mailgw(tmp_path / "nss", venv / "bin/mailgw", "check", "-c", config)
        else:
            check = run(venv / "bin/mailgw", "check", "-c", config)
    else:   # not root: nobody to switch to; the README's command minus runuser
        check = run(venv / "bin/mailgw", "check", "-c", config)
    assert "OK" in check.stdout
