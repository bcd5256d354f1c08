from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from fedprune.common.bundle import Bundle, EnrollmentError, load_bundle, save_bundle
from fedprune.protocol.crypto import Identity


def bundle() -> Bundle:
    return Bundle("fed", "pi-1", Identity.generate(), Identity.generate().public,
                  "mqtts://broker:8883", "pi-1", "pw", b"-----BEGIN CERTIFICATE-----\n...\n")


def test_round_trip_keeps_keys_and_pins(tmp_path: Path) -> None:
    original = bundle()
    path = tmp_path / "pi-1.bundle"
    save_bundle(path, original)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    loaded = load_bundle(path)
    assert loaded.identity.public == original.identity.public
    assert loaded.coordinator == original.coordinator
    assert (loaded.federation, loaded.device_id, loaded.broker_url, loaded.ca_pem) == (
        "fed", "pi-1", "mqtts://broker:8883", original.ca_pem)


def test_world_readable_bundle_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, bundle())
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        load_bundle(path)
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("device_signing_key"),
    lambda d: d.update(format="other/1"),
    lambda d: d.update(device_id="a/b"),
    lambda d: d.update(coordinator_public="!!notbase64"),
    lambda d: d.update(device_agreement_key="AAAA"),
])
def test_malformed_bundles_are_enrollment_errors_naming_the_file(tmp_path: Path, mutate) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, bundle())
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))
    with pytest.raises(EnrollmentError, match="b.json"):
        load_bundle(path)


def test_missing_bundle_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="enroll"):
        load_bundle(tmp_path / "absent.json")
