"""The registry's pure rules: filters, credentials, presence, input checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.registry import credentials, filtering, presence, validation
from services.runtime.errors import MawError

F = filtering.FieldType
SCHEMA: filtering.Schema = {
    "verb": F("str"),
    "level": F("enum", {"INFO": 1, "WARNING": 2, "ERROR": 3}),
    "draining": F("bool"),
    "sequence": F("int"),
    "time": F("time"),
    "labels": F("str", prefix_map=True),
}


@pytest.mark.parametrize(
    ("text", "record", "expected"),
    [
        ('verb = "auth.login"', {"verb": "auth.login"}, True),
        ('verb = "auth.*"', {"verb": "auth.login_failed"}, True),
        ('verb = "auth.*"', {"verb": "task.created"}, False),
        ("level >= WARNING", {"level": 3}, True),
        ("level >= WARNING", {"level": 1}, False),
        ("NOT draining = true", {"draining": False}, True),
        ("sequence > 5 AND (level = ERROR OR verb = x)", {"sequence": 6, "level": 1, "verb": "x"}, True),
        ("sequence > 5 OR level = ERROR", {"sequence": 1, "level": 1}, False),
        ('labels.site = "garage"', {"labels.site": "garage"}, True),
        ('time > "2025-01-01T00:00:00Z"', {"time": datetime(2026, 1, 1, tzinfo=UTC)}, True),
        ('verb = "x\'; DROP TABLE activity; --"', {"verb": "x"}, False),
        ("", {}, True),
    ],
)
def test_filters_match_records_as_documented(text: str, record: dict[str, object], expected: bool) -> None:
    tree = filtering.parse(text, SCHEMA)
    assert filtering.matches(tree, record.get) is expected


@pytest.mark.parametrize(
    "text",
    [
        "nope = 1",
        "verb",
        "verb =",
        "(verb = x",
        "verb = x)",
        "level = LOUD",
        "draining = maybe",
        "sequence = 1.5",
        "time > yesterday",
        "draining : true",
        "x" * 2001,
        "(" * 40 + "verb = x" + ")" * 40,
        " OR ".join(["verb = x"] * 60),
    ],
)
def test_malformed_filters_are_invalid_argument_on_the_filter_field(text: str) -> None:
    with pytest.raises(MawError) as err:
        filtering.parse(text, SCHEMA)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter" in err.value.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_either_parses_or_is_invalid_argument_never_a_crash(text: str) -> None:
    try:
        tree = filtering.parse(text, SCHEMA)
    except MawError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    filtering.matches(tree, lambda field: None)


def test_a_retried_call_derives_the_same_secret_and_another_request_id_does_not() -> None:
    a = credentials.derived_secret("maw_rft_", "maw_rft_parent", "refresh", "r1")
    assert a == credentials.derived_secret("maw_rft_", "maw_rft_parent", "refresh", "r1")
    assert a != credentials.derived_secret("maw_rft_", "maw_rft_parent", "refresh", "r2")
    assert a != credentials.derived_secret("maw_rft_", "maw_rft_other", "refresh", "r1")
    assert credentials.derived_secret("maw_rft_", "p", "refresh", "") != credentials.derived_secret(
        "maw_rft_", "p", "refresh", ""
    )
    assert a.startswith("maw_rft_") and len(a) > 40


def test_token_state_revocation_beats_expiry_beats_exhaustion() -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(seconds=1), now + timedelta(hours=1)
    assert credentials.token_state(now, past, past, 5, 1) == credentials.TokenState.REVOKED
    assert credentials.token_state(now, None, past, 5, 1) == credentials.TokenState.EXPIRED
    assert credentials.token_state(now, None, future, 1, 1) == credentials.TokenState.EXHAUSTED
    assert credentials.token_state(now, None, None) == credentials.TokenState.ACTIVE


def test_an_api_token_acts_with_the_lower_of_its_role_and_its_owners() -> None:
    assert credentials.effective_role(3, 1) == credentials.Role.VIEWER
    assert credentials.effective_role(2, 3) == credentials.Role.OPERATOR


def test_passwords_are_hashed_with_argon2_and_checked() -> None:
    hashed = credentials.hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$") and "correct" not in hashed
    assert credentials.verify_password(hashed, "correct horse battery")
    assert not credentials.verify_password(hashed, "wrong")
    assert not credentials.verify_password(None, "correct horse battery")


def test_worker_status_revocation_beats_flags_which_beat_presence() -> None:
    s = presence.status
    assert s(revoked=True, disabled=True, draining=True, present=True) == presence.WorkerStatus.REVOKED
    assert s(revoked=False, disabled=True, draining=False, present=True) == presence.WorkerStatus.DISABLED
    assert s(revoked=False, disabled=False, draining=True, present=False) == presence.WorkerStatus.OFFLINE
    assert s(revoked=False, disabled=False, draining=True, present=True) == presence.WorkerStatus.DRAINING
    assert s(revoked=False, disabled=False, draining=False, present=True) == presence.WorkerStatus.ONLINE


def test_reports_are_ordered_by_session_then_sequence_and_a_late_old_session_loses() -> None:
    assert presence.newer((10, "s1", 2), (10, "s1", 1))
    assert not presence.newer((10, "s1", 1), (10, "s1", 1))
    assert presence.newer((20, "s2", 1), (10, "s1", 9))
    assert not presence.newer((10, "s1", 10), (20, "s2", 1))
    assert presence.newer((1, "s", 0), None)
    assert presence.presence_ttl_s(10) == 30


def test_page_tokens_refuse_forgery_and_reuse_with_another_query() -> None:
    token = validation.next_page_token(100, "q1")
    assert validation.page_token(token, "q1") == 100
    for bad, query in ((token, "q2"), ("garbage!!", "q1"), ("", "q1")):
        if not bad:
            assert validation.page_token(bad, query) == 0
            continue
        with pytest.raises(MawError) as err:
            validation.page_token(bad, query)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
