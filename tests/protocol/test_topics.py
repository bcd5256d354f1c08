import pytest
from hypothesis import given, strategies as st

from fedprune.protocol import topics
from fedprune.protocol.errors import DecodeError
from fedprune.protocol.topics import Topic, TopicKind

ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)


@given(fed=ids, dev=ids, kind=st.sampled_from([k for k in TopicKind if k.per_device]))
def test_per_device_topics_round_trip_with_device_last(fed, dev, kind):
    topic = str(Topic(fed, kind, dev))
    assert topic == f"fedprune/v1/{fed}/{kind.value}/{dev}"
    assert topics.parse_topic(topic) == Topic(fed, kind, dev)


def test_builders_and_broadcasts():
    assert topics.task_topic("f") == "fedprune/v1/f/task"
    assert topics.release_topic("f", 3) == "fedprune/v1/f/release/3"
    assert topics.parse_topic("fedprune/v1/f/release/3").retain
    assert not topics.parse_topic(topics.update_topic("f", "d")).retain
    assert topics.parse_topic("fedprune/v1/f/task") == Topic("f", TopicKind.TASK)


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "a/b", "a\0", "x" * 65, "a b", "é", "+", "#"])
def test_ids_that_could_widen_a_subscription_are_refused(bad):
    with pytest.raises(ValueError, match="expected 1-64 characters"):
        topics.update_topic("fed", bad)
    with pytest.raises(ValueError):
        topics.coordinator_filters(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "fedprune/v2/f/task", "fedprune/v1/f/task/extra", "fedprune/v1/f/update", "fedprune/v1/f/update/+",
        "fedprune/v1/f/bogus/d", "fedprune/v1/+/task", "fedprune/v1/f/release/x", "fedprune/v1/f/release/-1",
        "fedprune/v1/f/release/99999999", "x" * 300, "", "fedprune/v1//task",
    ],
)
def test_parser_refuses_topics_outside_the_scheme(bad):
    with pytest.raises(DecodeError):
        topics.parse_topic(bad)


def test_filters_use_single_level_wildcards():
    assert topics.coordinator_filters("f") == (
        "fedprune/v1/f/register/+", "fedprune/v1/f/update/+", "fedprune/v1/f/status/+",
    )
    assert topics.agent_filters("f", "d") == ("fedprune/v1/f/task", "fedprune/v1/f/release/+", "fedprune/v1/f/inbox/d")
