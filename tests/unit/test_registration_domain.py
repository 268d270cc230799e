"""Registration ids and sign-up validation: pure rules, no I/O."""

from __future__ import annotations

import datetime as dt

import pytest

from libs.errors import InvalidArgument
from services.registration.domain.registration_ids import IdCheck, RegistrationIds
from services.registration.domain.validation import validate_sign_up

TODAY = dt.date(2026, 11, 28)


def sign_up(**overrides):
    fields = dict(name="Ada Lovelace", birth_year=1990, birth_month=12, birth_day=10, course_id="cs101",
                  email="ada@example.com", request_id="", locale="", today=TODAY)
    fields.update(overrides)
    return validate_sign_up(**fields)


def violated(**overrides) -> set[str]:
    with pytest.raises(InvalidArgument) as error:
        sign_up(**overrides)
    return {v.field for v in error.value.violations}


def test_issued_ids_verify_and_others_do_not():
    ids = RegistrationIds("secret")
    issued = ids.issue()
    assert ids.check(issued) is IdCheck.ISSUED
    assert RegistrationIds("another secret").check(issued) is IdCheck.NOT_ISSUED
    middle = len(issued) // 2
    flipped = issued[:middle] + ("a" if issued[middle] != "a" else "b") + issued[middle + 1:]
    assert ids.check(flipped) is IdCheck.NOT_ISSUED
    # The last character carries padding bits: another spelling of the same bytes is refused.
    last = issued[-1]
    alias = next(c for c in "abcdefghijklmnopqrstuvwxyz234567"
                 if c != last and (int("abcdefghijklmnopqrstuvwxyz234567".index(c)) >> 2)
                 == (int("abcdefghijklmnopqrstuvwxyz234567".index(last)) >> 2))
    assert ids.check(issued[:-1] + alias) is IdCheck.MALFORMED
    assert ids.check("reg_short") is IdCheck.MALFORMED
    assert ids.check("x" * len(issued)) is IdCheck.MALFORMED
    assert ids.check("") is IdCheck.MALFORMED


def test_the_same_request_id_always_maps_to_the_same_registration():
    ids = RegistrationIds("secret")
    assert ids.issue("req-1") == ids.issue("req-1")
    assert ids.issue("req-1") != ids.issue("req-2")
    assert ids.issue() != ids.issue()


def test_an_issued_id_in_another_case_is_canonicalised_and_only_the_issued_spelling_checks():
    ids = RegistrationIds("secret")
    issued = ids.issue()
    for spelling in (issued.upper(), issued[:4] + issued[4:].upper(), f" {issued} "):
        assert ids.check(spelling) is IdCheck.MALFORMED
        assert ids.canonical(spelling) == issued
    assert ids.check(ids.canonical(issued.upper())) is IdCheck.ISSUED
    assert ids.canonical("REG_\u0130") == "REG_\u0130"  # non-ASCII is left to be refused as is


def test_one_request_id_for_two_sign_ups_gives_two_registrations():
    ids = RegistrationIds("secret")
    alice = ids.issue("1", course_id="bio150", email="alice1@example.com")
    assert alice == ids.issue("1", course_id="bio150", email="Alice1@example.com")
    assert alice != ids.issue("1", course_id="hist120", email="alice1@example.com")
    assert alice != ids.issue("1", course_id="bio150", email="carol2@example.com")
    assert alice != ids.issue("2", course_id="bio150", email="alice1@example.com")


def test_a_valid_sign_up_is_normalized():
    result = sign_up(name="  Ada   Lovelace ", email="Ada@Example.COM")
    assert result.name == "Ada Lovelace"
    assert result.email == "Ada@example.com"  # the domain is case-insensitive, the local part is kept
    assert result.birth_date == dt.date(1990, 12, 10)
    assert result.locale == "en"


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        ({"name": ""}, {"name"}),
        ({"name": "Eve\r\nBcc: x@evil.test"}, {"name"}),
        ({"name": "Eve\x85Bcc"}, {"name"}),  # NEL, a C1 control str.split() would have eaten
        ({"name": "Ada \u202eecalevoL"}, {"name"}),  # RIGHT-TO-LEFT OVERRIDE
        ({"name": "Ada\u2066Lovelace"}, {"name"}),  # LEFT-TO-RIGHT ISOLATE
        ({"name": "Ada\u200bLovelace"}, {"name"}),  # ZERO WIDTH SPACE
        ({"name": "Ada\u2028Lovelace"}, {"name"}),  # LINE SEPARATOR
        ({"name": "Ada\ue000"}, {"name"}),  # private use
        ({"name": "Ada\ufffe"}, {"name"}),  # noncharacter
        ({"name": "Ada\U000e0001"}, {"name"}),  # LANGUAGE TAG (format)
        ({"name": "a" * 201}, {"name"}),
        ({"birth_year": 0, "birth_month": 0, "birth_day": 0}, {"birth_date"}),
        ({"birth_month": 2, "birth_day": 30}, {"birth_date"}),
        ({"birth_year": 2027}, {"birth_date"}),
        ({"birth_year": 1890}, {"birth_date"}),
        ({"birth_year": 2026, "birth_month": 6, "birth_day": 1}, {"birth_date"}),
        ({"course_id": ""}, {"course_id"}),
        ({"course_id": "CS 101; DROP"}, {"course_id"}),
        ({"email": "not-an-email"}, {"email"}),
        ({"email": "a@b@c.com"}, {"email"}),
        ({"locale": "klingon"}, {"locale"}),
        ({"request_id": "r" * 129}, {"request_id"}),
        ({"name": "", "email": "", "course_id": ""}, {"name", "email", "course_id"}),
    ],
)
def test_bad_fields_are_each_named(overrides, fields):
    assert violated(**overrides) == fields


def test_names_are_stored_in_nfc_and_keep_the_joiners_scripts_need():
    assert sign_up(name="Jose\u0301  Silva").name == "Jos\u00e9 Silva"  # decomposed é composed
    assert sign_up(name="\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645").name.count("\u200c") == 1  # ZWNJ
    assert sign_up(name="\u0915\u094d\u200d\u0937").name.count("\u200d") == 1  # ZWJ, Devanagari
    assert sign_up(name="a" * 200).name == "a" * 200


def test_without_smtputf8_at_the_relay_only_addresses_it_can_deliver_are_accepted():
    strict = {"internationalized_mailboxes": False}
    assert sign_up(email="x19@xn--bcher-kva.example", **strict).email == "x19@bücher.example"
    assert sign_up(email="ada@bücher.example", **strict).email == "ada@bücher.example"  # sent as xn--
    assert violated(email="josé@exemplo.com.br", **strict) == {"email"}
    assert sign_up(email="josé@exemplo.com.br").email == "josé@exemplo.com.br"  # a relay with SMTPUTF8


def test_internationalized_addresses_are_accepted():
    assert sign_up(email="josé@exemplo.com.br").email == "josé@exemplo.com.br"
