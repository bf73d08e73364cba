from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.core.signature import (
    DEFAULT_TOLERANCE,
    MAX_SIGNATURE_HEADER_LENGTH,
    MAX_SIGNATURE_ITEMS,
    MAX_TIMESTAMP,
    SignatureHeader,
    VerifiedSignature,
    compute_signature,
    parse_signature_header,
    sign_payload,
    verify_signature,
)
from idempay.errors import ConfigurationError, SignatureVerificationError

SECRET = "whsec_current_0123456789abcdef"
OLD_SECRET = "whsec_previous_fedcba9876543210"
T = 1_700_000_000
BODY = b'{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}'
HEX = "0123456789abcdef" * 4


def _reason(excinfo: pytest.ExceptionInfo[SignatureVerificationError]) -> str:
    return excinfo.value.reason


def _verify(
    header: str | None,
    *,
    payload: bytes = BODY,
    secrets: tuple[str, ...] = (SECRET,),
    now: float = T,
    tolerance: int = DEFAULT_TOLERANCE,
) -> VerifiedSignature:
    return verify_signature(payload, header, secrets, now=now, tolerance=tolerance)


def _refusal(
    header: str | None,
    *,
    payload: bytes = BODY,
    secrets: tuple[str, ...] = (SECRET,),
    now: float = T,
    tolerance: int = DEFAULT_TOLERANCE,
) -> str:
    with pytest.raises(SignatureVerificationError) as excinfo:
        _verify(header, payload=payload, secrets=secrets, now=now, tolerance=tolerance)
    return _reason(excinfo)


# compute_signature


def test_compute_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert compute_signature(BODY, SECRET, timestamp=T) == expected


def test_compute_signature_keys_with_the_utf8_of_the_secret() -> None:
    secret = "whsec_clé"
    expected = hmac.new(secret.encode("utf-8"), b"5.x", hashlib.sha256).hexdigest()
    assert compute_signature(b"x", secret, timestamp=5) == expected


def test_compute_signature_accepts_other_bytes_like_bodies() -> None:
    plain = compute_signature(BODY, SECRET, timestamp=T)
    assert compute_signature(cast("Any", bytearray(BODY)), SECRET, timestamp=T) == plain
    assert compute_signature(cast("Any", memoryview(BODY)), SECRET, timestamp=T) == plain


@pytest.mark.parametrize("timestamp", [-1, MAX_TIMESTAMP + 1, True, 1.5, "1"])
def test_compute_signature_refuses_bad_timestamps(timestamp: Any) -> None:
    with pytest.raises(ConfigurationError, match="timestamp"):
        compute_signature(BODY, SECRET, timestamp=timestamp)


@pytest.mark.parametrize("secret", ["", None, b"whsec_x", "\ud800"])
def test_compute_signature_refuses_bad_secrets(secret: Any) -> None:
    with pytest.raises(ConfigurationError, match="secret"):
        compute_signature(BODY, secret, timestamp=T)


def test_compute_signature_refuses_a_decoded_body() -> None:
    with pytest.raises(ConfigurationError, match="bytes"):
        compute_signature(cast("Any", BODY.decode()), SECRET, timestamp=T)


# sign_payload


def test_sign_payload_with_one_secret_builds_t_and_one_v1() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert header == f"t={T},v1={compute_signature(BODY, SECRET, timestamp=T)}"


def test_sign_payload_with_several_secrets_keeps_their_order() -> None:
    header = sign_payload(BODY, [SECRET, OLD_SECRET], timestamp=T)
    assert header == (
        f"t={T},v1={compute_signature(BODY, SECRET, timestamp=T)}"
        f",v1={compute_signature(BODY, OLD_SECRET, timestamp=T)}"
    )


def test_sign_payload_accepts_the_extreme_timestamps() -> None:
    assert sign_payload(b"", SECRET, timestamp=0).startswith("t=0,v1=")
    header = sign_payload(b"", SECRET, timestamp=MAX_TIMESTAMP)
    assert parse_signature_header(header).timestamp == MAX_TIMESTAMP


@pytest.mark.parametrize("timestamp", [-1, MAX_TIMESTAMP + 1])
def test_sign_payload_refuses_timestamps_the_header_cannot_carry(timestamp: int) -> None:
    with pytest.raises(ConfigurationError, match="timestamp"):
        sign_payload(BODY, SECRET, timestamp=timestamp)


@pytest.mark.parametrize("secrets", [[], (), "", [SECRET, ""], {SECRET}])
def test_sign_payload_refuses_missing_or_empty_secrets(secrets: Any) -> None:
    with pytest.raises(ConfigurationError, match="secret"):
        sign_payload(BODY, secrets, timestamp=T)


def test_sign_payload_refuses_more_secrets_than_a_header_may_carry() -> None:
    secrets = [f"whsec_{n}" for n in range(MAX_SIGNATURE_ITEMS + 1)]
    with pytest.raises(ConfigurationError, match="at most"):
        sign_payload(BODY, secrets, timestamp=T)
    header = sign_payload(BODY, secrets[:-1], timestamp=T)
    assert len(parse_signature_header(header).signatures) == MAX_SIGNATURE_ITEMS


def test_sign_payload_refuses_a_decoded_body() -> None:
    with pytest.raises(ConfigurationError, match="bytes"):
        sign_payload(cast("Any", "{}"), SECRET, timestamp=T)


# parse_signature_header


def test_parse_keeps_v1_values_in_order_and_ignores_other_schemes() -> None:
    a, b = "a" * 64, "b" * 64
    parsed = parse_signature_header(f"v0={HEX},v1={a},t=42,v9=x=y,v1={b}")
    assert parsed == SignatureHeader(timestamp=42, signatures=(a, b))


def test_parse_accepts_twelve_digits_and_leading_zeros() -> None:
    assert parse_signature_header(f"t=999999999999,v1={HEX}").timestamp == 999_999_999_999
    assert parse_signature_header(f"t=0007,v1={HEX}").timestamp == 7


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header(header: str | None) -> None:
    assert _refusal(header) == "missing_header"


def test_header_longer_than_the_limit_is_malformed() -> None:
    header = f"t={T},v1={HEX},v0=" + "a" * MAX_SIGNATURE_HEADER_LENGTH
    assert _refusal(header[: MAX_SIGNATURE_HEADER_LENGTH + 1]) == "malformed_header"


def test_header_at_the_length_limit_is_parsed() -> None:
    head = f"t={T},v1={HEX},v0="
    header = head + "a" * (MAX_SIGNATURE_HEADER_LENGTH - len(head))
    assert len(header) == MAX_SIGNATURE_HEADER_LENGTH
    assert parse_signature_header(header).signatures == (HEX,)


@pytest.mark.parametrize(
    "timestamp",
    ["", "-1", "+5", "1e9", "١٢٣", " 5", "5 ", "1_000", "0x10", "1.5", "9" * 13, "\uff15"],
)
def test_malformed_timestamps(timestamp: str) -> None:
    assert _refusal(f"t={timestamp},v1={HEX}") == "malformed_header"


@pytest.mark.parametrize(
    "header",
    [
        f"t={T},t={T},v1={HEX}",  # duplicate t
        f"v1={HEX}",  # no t at all
        f"t={T}, v1={HEX}",  # whitespace between items
        f"t={T},v1={HEX} ",  # trailing whitespace
        f" t={T},v1={HEX}",  # leading whitespace
        f"t={T},v1 ={HEX}",  # whitespace before "="
        f"t={T},v1={HEX}\n",  # a trailing newline must not slip through `$`
        f"t={T},v1={HEX.upper()}",  # uppercase hex
        f"t={T},v1={HEX[:63]}",  # 63 hex digits
        f"t={T},v1={HEX}0",  # 65 hex digits
        f"t={T},v1={'g' * 64}",  # not hex
        f"t={T},,v1={HEX}",  # empty item
        f"t={T},v1={HEX},",  # trailing comma
        f"t={T},v1",  # missing "="
        f"t={T},v1=",  # empty value
        f"t={T},v1={HEX},v0=",  # empty value of an ignored scheme
        f"t={T},={HEX}",  # empty scheme
        f"t={T},V1={HEX}",  # uppercase scheme
        f"t={T},1v={HEX}",  # scheme starting with a digit
        f"t={T},v-1={HEX}",  # punctuation in the scheme
        f"t={T},v1={HEX},v0=caf\u00e9",  # non-ASCII in an ignored value
        f"t={T},v1={HEX},v0=a\tb",  # control character in an ignored value
        f"t={T},v1=\u0660{HEX[1:]}",  # a Unicode digit inside v1
    ],
)
def test_malformed_headers(header: str) -> None:
    assert _refusal(header) == "malformed_header"


def test_only_unknown_schemes_means_no_signatures() -> None:
    assert _refusal(f"t={T},v0={HEX},v2=abc") == "no_signatures"
    assert _refusal(f"t={T}") == "no_signatures"


def test_absurd_number_of_signatures() -> None:
    header = f"t={T}," + ",".join([f"v1={HEX}"] * (MAX_SIGNATURE_ITEMS + 1))
    assert len(header) <= MAX_SIGNATURE_HEADER_LENGTH
    assert _refusal(header) == "too_many_signatures"


def test_absurd_number_of_short_items_is_refused_before_parsing_them() -> None:
    assert _refusal(",".join(["v0=a"] * 500)) == "too_many_signatures"


def test_ignored_schemes_count_towards_the_limit() -> None:
    ignored = ",".join(["v0=a"] * MAX_SIGNATURE_ITEMS)
    assert _refusal(f"t={T},v1={HEX},{ignored}") == "too_many_signatures"
    fewer = ",".join(["v0=a"] * (MAX_SIGNATURE_ITEMS - 1))
    assert parse_signature_header(f"t={T},v1={HEX},{fewer}").signatures == (HEX,)


def test_exactly_the_limit_of_signatures_is_accepted() -> None:
    header = sign_payload(BODY, [f"whsec_{n}" for n in range(MAX_SIGNATURE_ITEMS)], timestamp=T)
    result = _verify(header, secrets=(f"whsec_{MAX_SIGNATURE_ITEMS - 1}",))
    assert result == VerifiedSignature(timestamp=T, secret_index=0)


def test_refusal_messages_never_echo_the_header() -> None:
    marker = "deadbeef" * 8
    for header in (f"t=x{marker},v1={marker}", f"t={T},v1={marker.upper()}", f"t={T},v0={marker}"):
        with pytest.raises(SignatureVerificationError) as excinfo:
            _verify(header)
        assert marker not in str(excinfo.value).lower()
        assert marker not in json.dumps(excinfo.value.to_problem()).lower()


# verify_signature


def test_valid_single_signature() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _verify(header) == VerifiedSignature(timestamp=T, secret_index=0)


def test_rotation_either_v1_may_match() -> None:
    old_only = sign_payload(BODY, OLD_SECRET, timestamp=T)
    both = sign_payload(BODY, [OLD_SECRET, SECRET], timestamp=T)
    assert _verify(old_only, secrets=(SECRET, OLD_SECRET)).secret_index == 1
    assert _verify(both, secrets=(SECRET, OLD_SECRET)).secret_index == 0
    assert _verify(both, secrets=(SECRET,)).secret_index == 0
    assert _verify(both, secrets=(OLD_SECRET,)).secret_index == 0


def test_first_matching_secret_index_is_reported() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    result = _verify(header, secrets=("whsec_other", SECRET, SECRET))
    assert result.secret_index == 1


def test_a_bad_v1_next_to_a_good_one_does_not_matter() -> None:
    good = compute_signature(BODY, SECRET, timestamp=T)
    assert _verify(f"t={T},v1={'0' * 64},v1={good}").secret_index == 0
    assert _verify(f"t={T},v1={good},v1={'0' * 64}").secret_index == 0


def test_a_v0_carrying_the_right_digest_is_ignored() -> None:
    good = compute_signature(BODY, SECRET, timestamp=T)
    assert _refusal(f"t={T},v0={good},v1={'0' * 64}") == "no_match"


def test_revoked_secret_fails() -> None:
    header = sign_payload(BODY, OLD_SECRET, timestamp=T)
    assert _verify(header, secrets=(SECRET, OLD_SECRET)).secret_index == 1
    assert _refusal(header, secrets=(SECRET,)) == "no_match"


def test_body_changed_by_one_byte_fails() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    for index in (0, len(BODY) // 2, len(BODY) - 1):
        tampered = bytearray(BODY)
        tampered[index] ^= 0x01
        assert _refusal(header, payload=bytes(tampered)) == "no_match"
    assert _refusal(header, payload=BODY + b" ") == "no_match"
    assert _refusal(header, payload=BODY[:-1]) == "no_match"


def test_reserialised_body_fails() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert reserialised != BODY
    assert json.loads(reserialised) == json.loads(BODY)
    assert _refusal(header, payload=reserialised) == "no_match"


def test_signature_is_bound_to_its_timestamp() -> None:
    good = compute_signature(BODY, SECRET, timestamp=T)
    assert _refusal(f"t={T + 1},v1={good}", now=T + 1) == "no_match"


def test_non_utf8_body_is_verified_as_bytes() -> None:
    body = b"\xff\xfe\x00 not text"
    header = sign_payload(body, SECRET, timestamp=T)
    assert _verify(header, payload=body).timestamp == T
    assert _refusal(header, payload=b"\xff\xfe\x00 not texT") == "no_match"


@pytest.mark.parametrize("offset", [-DEFAULT_TOLERANCE, DEFAULT_TOLERANCE, -0.5, 299.999, 0])
def test_timestamps_inside_the_window_are_accepted(offset: float) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _verify(header, now=T - offset).timestamp == T


@pytest.mark.parametrize("offset", [DEFAULT_TOLERANCE + 1, DEFAULT_TOLERANCE + 0.001, 86_400])
def test_old_timestamps_outside_the_window_are_refused(offset: float) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _refusal(header, now=T + offset) == "timestamp_outside_tolerance"


@pytest.mark.parametrize("offset", [DEFAULT_TOLERANCE + 1, DEFAULT_TOLERANCE + 0.001, 86_400])
def test_future_timestamps_outside_the_window_are_refused(offset: float) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _refusal(header, now=T - offset) == "timestamp_outside_tolerance"


def test_custom_tolerance_boundaries() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _verify(header, now=T + 10, tolerance=10).timestamp == T
    assert _verify(header, now=T - 10, tolerance=10).timestamp == T
    assert _refusal(header, now=T + 11, tolerance=10) == "timestamp_outside_tolerance"
    assert _refusal(header, now=T - 11, tolerance=10) == "timestamp_outside_tolerance"


def test_forged_stale_header_reports_no_match_not_the_window() -> None:
    assert _refusal(f"t=1,v1={HEX}") == "no_match"


@pytest.mark.parametrize("tolerance", [0, -1, -300, True, 1.5, None])
def test_zero_or_negative_tolerance_is_a_configuration_error(tolerance: Any) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    with pytest.raises(ConfigurationError, match="tolerance"):
        _verify(header, tolerance=tolerance)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, None, "1700000000", True])
def test_unusable_clock_is_a_configuration_error(now: Any) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    with pytest.raises(ConfigurationError, match="now"):
        _verify(header, now=now)


def test_integer_clock_is_accepted() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert _verify(header, now=int(T)).timestamp == T


@pytest.mark.parametrize(
    "secrets", [(), [], ("",), (SECRET, ""), (SECRET, None), SECRET, None, b"whsec_x"]
)
def test_bad_secrets_are_a_configuration_error(secrets: Any) -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    with pytest.raises(ConfigurationError, match="secret"):
        _verify(header, secrets=secrets)


def test_configuration_is_checked_before_the_request() -> None:
    with pytest.raises(ConfigurationError):
        verify_signature(BODY, None, [], now=T)
    with pytest.raises(ConfigurationError):
        verify_signature(BODY, None, [SECRET], now=T, tolerance=0)


def test_a_decoded_body_is_a_configuration_error() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    with pytest.raises(ConfigurationError, match="bytes"):
        _verify(header, payload=cast("Any", BODY.decode()))


def test_secrets_may_be_a_list() -> None:
    header = sign_payload(BODY, SECRET, timestamp=T)
    assert verify_signature(BODY, header, [OLD_SECRET, SECRET], now=T).secret_index == 1


# properties

secrets_strategy = st.text(min_size=1, max_size=80)


@given(
    payload=st.binary(max_size=2048),
    secrets=st.lists(secrets_strategy, min_size=1, max_size=4),
    timestamp=st.integers(min_value=0, max_value=MAX_TIMESTAMP),
    skew=st.integers(min_value=-DEFAULT_TOLERANCE, max_value=DEFAULT_TOLERANCE),
    data=st.data(),
)
def test_sign_then_verify_round_trips(
    payload: bytes, secrets: list[str], timestamp: int, skew: int, data: st.DataObject
) -> None:
    header = sign_payload(payload, secrets, timestamp=timestamp)
    parsed = parse_signature_header(header)
    assert parsed.timestamp == timestamp
    assert len(parsed.signatures) == len(secrets)
    chosen = data.draw(st.sampled_from(secrets))
    result = verify_signature(payload, header, [chosen], now=timestamp + skew)
    assert result == VerifiedSignature(timestamp=timestamp, secret_index=0)
    # Every configured secret that signed is found at its own first position.
    assert verify_signature(payload, header, secrets, now=timestamp).secret_index == 0


@given(
    payload=st.binary(max_size=512),
    other=st.binary(max_size=512),
    secret=secrets_strategy,
)
def test_a_different_body_never_verifies(payload: bytes, other: bytes, secret: str) -> None:
    header = sign_payload(payload, secret, timestamp=T)
    if other == payload:
        assert _verify(header, payload=other, secrets=(secret,)).timestamp == T
    else:
        with pytest.raises(SignatureVerificationError) as excinfo:
            _verify(header, payload=other, secrets=(secret,))
        assert excinfo.value.reason == "no_match"


@given(header=st.text(max_size=200))
def test_arbitrary_headers_fail_only_with_signature_errors(header: str) -> None:
    with pytest.raises(SignatureVerificationError) as excinfo:
        _verify(header)
    assert excinfo.value.reason in {
        "missing_header",
        "malformed_header",
        "no_signatures",
        "too_many_signatures",
        "no_match",
    }
