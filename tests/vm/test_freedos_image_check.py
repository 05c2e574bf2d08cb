"""The rig refuses a FreeDOS floppy whose sha256 is not the expected one (no VM booted)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from snapimg.errors import UsageError
from vmtests import config
from vmtests.guests import freedos


def test_default_image_is_checked_against_its_published_sha256(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("SNAPIMG_FREEDOS_IMAGE", "SNAPIMG_FREEDOS_SHA256"):
        monkeypatch.delenv(var, raising=False)
    settings = config.load()
    assert settings.freedos_image == config.DEFAULT_FREEDOS_IMAGE
    assert settings.freedos_sha256 == config.DEFAULT_FREEDOS_SHA256


def test_an_image_with_another_sha256_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "not-freedos.img"
    image.write_bytes(bytes(1474560))
    monkeypatch.setenv("SNAPIMG_FREEDOS_IMAGE", str(image))
    monkeypatch.setenv("SNAPIMG_FREEDOS_SHA256", config.DEFAULT_FREEDOS_SHA256)
    settings = dataclasses.replace(config.load(), cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match="has sha256 [0-9a-f]{64}, expected 2546c15c"):
        freedos.build(settings)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_another_image_without_an_expected_sha256_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPIMG_FREEDOS_IMAGE", str(tmp_path / "mine.img"))
    monkeypatch.delenv("SNAPIMG_FREEDOS_SHA256", raising=False)
    assert config.load().freedos_sha256 is None
    monkeypatch.setenv("SNAPIMG_FREEDOS_SHA256", "abc")
    with pytest.raises(UsageError, match="64 hex digits"):
        config.load()
