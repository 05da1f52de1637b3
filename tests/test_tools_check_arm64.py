"""tools/check_arm64.py's host-side parts, without qemu or the network: the Debian mirror read from apt's sources
(deb822 and one-line), the pins read from a constraints file, and the site folder's cache key."""
from __future__ import annotations

import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))

import check_arm64  # noqa: E402


def test_mirror_from_deb822_sources_skips_security_and_other_suites(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert check_arm64.apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_sources_list(tmp_path):
    (tmp_path / "sources.list").write_text("deb [arch=amd64] https://other.example/apt cloud main\n"
                                           "deb [signed-by=/k.gpg] http://ftp.example/debian bookworm main\n")
    assert check_arm64.apt_mirror(tmp_path) == "http://ftp.example/debian"


def test_mirror_defaults_to_deb_debian_org(tmp_path):
    assert check_arm64.apt_mirror(tmp_path) == "http://deb.debian.org/debian"


def test_pins_are_read_from_the_shipped_constraints_files():
    pi, oldest = REPO / "requirements/aarch64.txt", REPO / "requirements/aarch64-oldest.txt"
    assert check_arm64.pinned(pi, "torch") == "2.10.0" and check_arm64.pinned(pi, "torchvision") == "0.25.0"
    assert check_arm64.pinned(oldest, "torch") == "2.5.1" and check_arm64.pinned(oldest, "onnxruntime") == "1.23.2"
    assert check_arm64.pinned(pi, "onnxruntime-training-cpu") is None


def test_the_oldest_torch_checked_is_pyprojects_minimum():
    assert '"torch>=2.5.1"' in (REPO / "pyproject.toml").read_text()
    assert check_arm64.pinned(REPO / "requirements/aarch64-oldest.txt", "torch") == "2.5.1"


def test_site_key_follows_pins_and_pyproject_not_comments():
    key = check_arm64.site_key("# pins\ntorch==2.10.0\nonnx==1.17.0\n", "[project]")
    assert check_arm64.site_key("onnx==1.17.0  # why\n\n# other words\ntorch==2.10.0\n", "[project]") == key
    assert check_arm64.site_key("torch==2.5.1\nonnx==1.17.0\n", "[project]") != key
    assert check_arm64.site_key("torch==2.10.0\nonnx==1.17.0\n", "[project]\nx") != key


def test_a_new_site_removes_only_its_own_constraints_earlier_sites(tmp_path, monkeypatch):
    sites = tmp_path / "sites"
    for name in ("aarch64-0123456789ab", "aarch64-0123456789ab.partial", "aarch64-oldest-ba9876543210"):
        (sites / name).mkdir(parents=True)
    constraints = tmp_path / "aarch64.txt"
    constraints.write_text("torch==2.10.0\n")
    monkeypatch.setattr(check_arm64, "uv_install", lambda uv, target, *a: target.mkdir(parents=True))
    site, reused = check_arm64.prepare_site(tmp_path, "uv", constraints, tmp_path / "x.whl")
    assert not reused and sorted(p.name for p in sites.iterdir()) == sorted([site.name, "aarch64-oldest-ba9876543210"])
