"""What a regular (non-editable) install gets: the compiled extension and the SQL.

Builds the wheel exactly as ``pip install .`` would (isolated build: setuptools and
Cython fetched for the build only), then imports the package from the unpacked
wheel, away from the source tree.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _can_compile() -> bool:
    """A C compiler and the Python and OpenSSL headers: what the extension needs."""
    import sysconfig

    include = pathlib.Path(sysconfig.get_paths()["include"])
    return (shutil.which(os.environ.get("CC", "cc")) is not None and (include / "Python.h").exists()
            and pathlib.Path("/usr/include/openssl/sha.h").exists())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    if not _can_compile():
        pytest.skip("no C compiler, Python or OpenSSL headers here: the extension is not built")
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
    for name in ("activationv1", "passwordrecoveryv1"):  # the shipped SES templates
        for part in ("subject.txt", "html.html", "text.txt"):
            assert f"mailroom/shipped_templates/{name}/{part}" in names
    assert "mailroom/monitor/web_page/app_index.html" in names  # the --web page (no remote font)
    assert not any(n.endswith((".c", ".pyx")) for n in names)


def test_installed_package_uses_the_compiled_extension(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "MAILROOM_IMPL"}
    env["PYTHONPATH"] = str(site)
    code = ("import mailroom, mailroom.wire as w, mailroom.ledger.migrate as m;"
            "from mailroom.templates import files;"
            "print(w.IMPL, mailroom.__file__, len(m.available()), files.shipped_dir())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    impl, location, migrations, templates = proc.stdout.split()
    assert impl == "c" and location.startswith(str(site)) and int(migrations) >= 2
    assert templates == str(site / "mailroom" / "shipped_templates")
    assert proc.stderr == ""            # no "extension not available" notice


def test_install_without_a_compiler_uses_the_pure_python_twin(tmp_path):
    """No working C compiler (CC=/bin/false): the wheel still builds, says so once, and the
    package runs on its pure-Python twin; MAILROOM_IMPL=c then refuses to start."""
    out = tmp_path / "wheel"
    # A copy of the sources: pip builds in the tree, where a build/ or a .so left by an earlier
    # build with a compiler would end up in this wheel.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "_wire.c", "__pycache__", ".venv", "venv"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(source)],
                           env={**env, "CC": "/bin/false"}, timeout=600, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert (build.stdout + build.stderr).count("compiled extension (mailroom.wire._wire) could not be built") == 1
    (found,) = out.glob("mailroom-*.whl")
    names = zipfile.ZipFile(found).namelist()
    assert not any(n.endswith(".so") for n in names), names
    site = tmp_path / "site"
    zipfile.ZipFile(found).extractall(site)
    env["PYTHONPATH"] = str(site)
    code = "import mailroom.wire as w; print(w.IMPL); print(w.FALLBACK)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "python", proc.stderr
    assert "compiled extension not available" in proc.stdout   # what the console scripts log once
    start = ("import sys; sys.argv = ['mailroom-supervisor'];"
             " from mailroom.cli import supervisor_main; supervisor_main()")
    refused = subprocess.run([sys.executable, "-c", start], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env={**env, "MAILROOM_IMPL": "c", "MAILROOM_DATABASE_URL": "postgresql://x",
                                              "MAILROOM_SECRET_KEY": "ab" * 32})
    assert refused.returncode == 2, refused.stderr
    assert "MAILROOM_IMPL=c" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
