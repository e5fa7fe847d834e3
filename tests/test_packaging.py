"""What a regular (non-editable) install gets: the compiled extension and the SQL.

Builds the wheel exactly as ``pip install .`` would (isolated build: setuptools and
Cython fetched for the build only), then imports the package from the unpacked
wheel, away from the source tree.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    (found,) = out.glob("mailroom-*.whl")
    return found


def test_wheel_contains_the_extension_and_migrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("mailroom/wire/_wire.") and n.endswith(".so") for n in names), names
    for sql in ("0_init.up.sql", "0_init.down.sql", "1_deliveries.up.sql", "1_deliveries.down.sql"):
        assert f"mailroom/migrations/{sql}" in names
    assert not any(n.endswith((".c", ".pyx")) for n in names)


def test_installed_package_uses_the_compiled_extension(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "MAILROOM_IMPL"}
    env["PYTHONPATH"] = str(site)
    code = ("import mailroom, mailroom.wire as w, mailroom.ledger.migrate as m;"
            "print(w.IMPL, mailroom.__file__, len(m.available()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    impl, location, migrations = proc.stdout.split()
    assert impl == "c" and location.startswith(str(site)) and int(migrations) >= 2
    assert proc.stderr == ""            # no "extension not available" notice
