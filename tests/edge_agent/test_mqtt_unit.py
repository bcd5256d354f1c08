"""MqttLink's pure parts: broker URLs, LinkConfig validation, topic checks, error messages."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune.common.mqtt import (
    BrokerAddress, LastWill, LinkConfig, PayloadTooLarge, parse_broker_url,
)
from fedprune.common.mqtt_config import check_filter

BASE = LinkConfig(url="mqtts://broker.example:8883", client_id="dev-0", username="dev-0", password="s3cret")


@pytest.mark.parametrize(
    "url,expected",
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("mqtt", "127.0.0.1", 1883)),
        ("mqtts://broker.example:8884", BrokerAddress("mqtts", "broker.example", 8884)),
        ("mqtts://broker.example", BrokerAddress("mqtts", "broker.example", 8883)),
        ("mqtt://localhost/", BrokerAddress("mqtt", "localhost", 1883)),
        ("mqtt://[::1]:1884", BrokerAddress("mqtt", "::1", 1884)),
    ],
)
def test_broker_urls_parse_with_default_ports(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected
    assert expected.tls == (expected.scheme == "mqtts")


@pytest.mark.parametrize(
    "url,complaint",
    [
        ("mqtt//x:1883", "missing '://'"),
        ("http://x:1883", "is not mqtt or mqtts"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://x:port", "port must be an integer"),
        ("mqtt://x:70000", "port must be an integer"),
        ("mqtt://x:0", "port must be an integer"),
        ("mqtt://user:pw@x:1883", "credentials"),
        ("mqtt://x:1883/topic", "unexpected path"),
        ("mqtt://x:1883?tls=1", "unexpected path"),
    ],
)
def test_bad_broker_urls_name_the_url_and_the_expected_form(url: str, complaint: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_broker_url(url)
    assert repr(url) in str(error.value) and complaint in str(error.value)


@given(st.text(max_size=40))
def test_any_text_is_a_url_or_a_value_error(text: str) -> None:
    try:
        address = parse_broker_url(text)
    except ValueError:
        return
    assert address.scheme in ("mqtt", "mqtts") and 1 <= address.port <= 65535 and address.host


@pytest.mark.parametrize(
    "change,complaint",
    [
        ({"url": "mqtt://x:1883", "ca_file": Path("/ca.crt")}, "use mqtts://"),
        ({"username": None}, "password given without username"),
        ({"cert_file": Path("/c.crt")}, "together"),
        ({"client_id": ""}, "client_id"),
        ({"protocol": "4"}, "protocol"),
        ({"keepalive_s": 1}, "keepalive_s"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_inflight": 0}, "max_inflight"),
        ({"session_expiry_s": -1}, "session_expiry_s"),
        ({"will": LastWill("a/+/b", b"x")}, "wildcards"),
        ({"will": LastWill("a/b", b"x", qos=2)}, "qos"),
    ],
)
def test_link_config_rejects_inconsistent_settings(change: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError) as error:
        replace(BASE, **change)
    assert complaint in str(error.value)


def test_link_config_never_shows_the_password() -> None:
    assert "s3cret" not in repr(BASE)
    assert BASE.address == BrokerAddress("mqtts", "broker.example", 8883)


@pytest.mark.parametrize("good", ["a", "a/b", "a/+/c", "+", "#", "a/#", "fedprune/v1/fed1/update/+", "/a"])
def test_valid_topic_filters_pass(good: str) -> None:
    check_filter(good)


@pytest.mark.parametrize("bad", ["", "a/#/b", "a+", "a/b#", "a/\0"])
def test_invalid_topic_filters_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="topic filter"):
        check_filter(bad)


def test_payload_too_large_says_how_to_fix_it() -> None:
    error = PayloadTooLarge("fedprune/v1/f/update/d", 200_000, 131_072)
    assert isinstance(error, ValueError)
    assert "200000" in str(error) and "131072" in str(error) and "chunks" in str(error)

