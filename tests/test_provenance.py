"""Provenance: the emolens git commit when run from a checkout, the accelerator, and where
converted models are cached (EMOLENS_CACHE, then XDG_CACHE_HOME)."""

import subprocess
from pathlib import Path

import pytest

import emolens
from emolens.model.loading import cache_dir
from emolens.store import provenance


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository holding a package folder with a tracked __init__.py."""
    package = tmp_path / "repo" / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    repo = tmp_path / "repo"
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return package


def test_git_commit_of_a_checkout_is_its_head_and_notes_uncommitted_changes(checkout):
    info = provenance.git_commit(checkout)
    assert info["commit"] == _git(checkout, "rev-parse", "HEAD") and len(info["commit"]) == 40
    assert info["dirty"] is False
    (checkout / "__init__.py").write_text("x = 2\n")
    assert provenance.git_commit(checkout)["dirty"] is True


def test_an_untracked_package_folder_has_no_commit(checkout, tmp_path):
    wheel_like = checkout.parent / "vendored"
    wheel_like.mkdir()
    (wheel_like / "__init__.py").write_text("")
    assert provenance.git_commit(wheel_like) is None  # inside a repo, but not tracked
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.git_commit(outside) is None


def test_manifest_names_this_checkout_and_the_accelerator():
    info = provenance.manifest()
    package = Path(emolens.__file__).parent
    tracked = (
        subprocess.run(
            ["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
            capture_output=True,
        ).returncode
        == 0
    )
    assert (info["git"] is not None) == tracked
    assert set(info["accelerator"]) >= {"torch_cuda", "cudnn", "gpus", "mps"}


def test_cache_falls_back_to_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("EMOLENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "emolens" and cache_dir().is_dir()
    monkeypatch.setenv("EMOLENS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EMOLENS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "emolens"
