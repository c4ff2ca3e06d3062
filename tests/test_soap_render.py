"""Rendering of SOAP notes for the push envelope: text, HTML, vitals, envelope id."""

from __future__ import annotations

import html.parser
import uuid
from typing import Any

import orjson
import pytest
from coggo.schemas.bus import SoapPush
from coggo.schemas.partner import SoapJson, SoapPushEnvelope
from coggo.soap.envelope import build_envelope, encode_envelope, envelope_id
from coggo.soap.render import (
    has_captured_vitals,
    note_for_push,
    render_html,
    render_text,
)

from tests.support.soap import hard_note, push_command


def _note(raw: dict[str, Any]) -> SoapJson:
    return SoapJson.model_validate(raw)


def _field(value: Any, type_: str = "free_text", **extra: Any) -> dict[str, Any]:
    return {"name": "f", "label": "Field", "type": type_, "value": value, **extra}


def _one_field_note(field: dict[str, Any]) -> SoapJson:
    return _note(
        {"schemaVersion": "1.0", "objective": {"title": "Objective", "fields": [field]}}
    )


class _TagCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse_html(fragment: str) -> _TagCollector:
    parser = _TagCollector()
    parser.feed(fragment)
    parser.close()
    return parser


class TestText:
    def test_hard_note_blocks_per_section(self) -> None:
        text = render_text(_note(hard_note()))

        assert set(text) == {"subjective", "objective", "plan"}
        assert text["subjective"] == (
            "Chief complaint: <script>alert('x')</script> limping & \"sore\"\n"
            "Owner's notes: Mange moins: mangé 50 % 🐕 食欲不振\nsecond line"
        )
        assert text["objective"] == (
            "Temperature (Rectal): 36.89 °C\n"
            "Weight: 11 kg\n"
            "Symptoms <b>seen</b>: Vomiting, Lethargy & weakness"
        )
        assert text["plan"] == "Follow-up: Recheck in 2 weeks"

    def test_not_mentioned_fields_left_out(self) -> None:
        text = render_text(_note(hard_note()))

        joined = "\n".join(text.values())
        assert "History" not in joined
        assert "Not mentioned" not in joined
        assert "Mucous membranes" not in joined
        assert "Heart rate" not in joined
        assert "Findings" not in joined

    def test_section_without_captured_fields_left_out(self) -> None:
        text = render_text(_note(hard_note()))

        assert "assessment" not in text

    @pytest.mark.parametrize(
        "value",
        ["Not mentioned", "", "   ", "not mentioned", [], ["", " "], ["Not mentioned"]],
    )
    def test_uncaptured_values(self, value: Any) -> None:
        type_ = "checkbox_text" if isinstance(value, list) else "free_text"
        assert render_text(_one_field_note(_field(value, type_))) == {}

    def test_zero_is_captured(self) -> None:
        field = _field(0, "number_with_unit", unit="/10", label="Pain score")

        assert render_text(_one_field_note(field)) == {"objective": "Pain score: 0 /10"}

    def test_number_string_gets_unit_once(self) -> None:
        with_unit = _field("38.5 °C", "number_with_unit", unit="°C")
        without_unit = _field("38.5", "number_with_unit", unit="°C")

        assert render_text(_one_field_note(with_unit)) == {
            "objective": "Field: 38.5 °C"
        }
        assert render_text(_one_field_note(without_unit)) == {
            "objective": "Field: 38.5 °C"
        }

    def test_narrative_only_note(self) -> None:
        note = _note({"schemaVersion": "1.0"})

        assert render_text(note, "Bright and alert.\nEating well.") == {
            "narrative": "Bright and alert.\nEating well."
        }

    def test_narrative_with_only_uncaptured_sections(self) -> None:
        raw = hard_note()
        for key in ("subjective", "objective", "plan"):
            del raw[key]

        assert render_text(_note(raw), "Seen today.") == {"narrative": "Seen today."}

    def test_narrative_not_added_to_captured_sections(self) -> None:
        text = render_text(_note(hard_note()), "Free narrative.")

        assert "narrative" not in text
        assert "subjective" in text

    def test_empty_note(self) -> None:
        assert render_text(_note({"schemaVersion": "1.0"}), "  ") == {}


class TestHtml:
    def test_script_in_value_escaped(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "<script>" not in fragment
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in fragment
        assert "limping &amp; &quot;sore&quot;" in fragment

    def test_label_markup_escaped(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "<b>" not in fragment
        assert "<dt>Symptoms &lt;b&gt;seen&lt;/b&gt;</dt>" in fragment

    def test_only_own_tags(self) -> None:
        parsed = _parse_html(render_html(_note(hard_note())))

        assert set(parsed.tags) <= {"div", "section", "h3", "dl", "dt", "dd", "br"}
        assert "script" not in parsed.tags

    def test_is_fragment(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert fragment.startswith('<div class="coggo-soap">')
        assert fragment.endswith("</div>")
        lowered = fragment.lower()
        for tag in ("<!doctype", "<html", "<head", "<body"):
            assert tag not in lowered

    def test_checkbox_array_joined(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "<dd>Vomiting, Lethargy &amp; weakness</dd>" in fragment

    def test_numbers_with_units(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "<dt>Temperature (Rectal)</dt><dd>36.89 °C</dd>" in fragment
        assert "<dt>Weight</dt><dd>11 kg</dd>" in fragment

    def test_unicode_kept(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "mangé 50 % 🐕 食欲不振<br>second line" in fragment

    def test_section_titles_from_note(self) -> None:
        parsed = _parse_html(render_html(_note(hard_note())))

        headings = [text for text in parsed.text if text in {"Subjective", "Plan"}]
        assert "Objective / Physical Exam" in parsed.text
        assert headings == ["Subjective", "Plan"]
        assert "Assessment" not in parsed.text

    def test_uncaptured_fields_left_out(self) -> None:
        fragment = render_html(_note(hard_note()))

        assert "Not mentioned" not in fragment
        assert "History" not in fragment
        assert "Heart rate" not in fragment

    def test_narrative_only_escaped_paragraphs(self) -> None:
        fragment = render_html(
            _note({"schemaVersion": "1.0"}), "Alert & <b>bright</b>.\n\nRecheck."
        )

        assert fragment == (
            '<div class="coggo-soap"><section data-section="narrative">'
            "<p>Alert &amp; &lt;b&gt;bright&lt;/b&gt;.</p><p>Recheck.</p>"
            "</section></div>"
        )

    def test_empty_note(self) -> None:
        assert render_html(_note({"schemaVersion": "1.0"})) == ""


class TestVitals:
    def test_confidence_alone_not_captured(self) -> None:
        assert has_captured_vitals({"confidence": "high"}) is False

    def test_empty_strings_not_captured(self) -> None:
        vitals = {"weight": "", "heartRate": "", "temperature": {}, "confidence": "low"}

        assert has_captured_vitals(vitals) is False

    def test_temperature_unit_alone_not_captured(self) -> None:
        assert has_captured_vitals({"temperature": {"unit": "celsius"}}) is False

    def test_one_vital_captured(self) -> None:
        assert has_captured_vitals({"heartRate": "120", "weight": ""}) is True

    def test_temperature_reading_captured(self) -> None:
        vitals = {"temperature": {"value": 36.89, "unit": "celsius"}}

        assert has_captured_vitals(vitals) is True

    def test_empty_vitals_dropped_from_json(self) -> None:
        pushed = note_for_push(hard_note())

        assert "vitals" not in pushed
        assert pushed["subjective"] == hard_note()["subjective"]

    def test_captured_vitals_kept_in_json(self) -> None:
        raw = hard_note()
        raw["vitals"]["heartRate"] = "120"

        assert note_for_push(raw)["vitals"] == raw["vitals"]


def _command(**data: Any) -> SoapPush:
    return SoapPush.model_validate(push_command("clinic-1", note=hard_note(), **data))


class TestEnvelope:
    def test_valid_against_spec(self) -> None:
        command = _command()
        envelope = build_envelope(
            command,
            push_command("c", note=hard_note())["data"]["note"],
            external_clinic_id="ext-9",
        )

        parsed = SoapPushEnvelope.model_validate(envelope)
        assert parsed.meta.note_id == "note-1"
        assert parsed.formats.json_ is not None
        assert parsed.formats.text is not None

    def test_meta_fields(self) -> None:
        command = _command(
            externalAppointmentId="apt_1029",
            vet={"name": "Dr. Ana Lópes", "externalStaffId": "stf_44"},
            language="fr",
        )
        envelope = build_envelope(command, hard_note(), external_clinic_id="ext-9")

        assert envelope["meta"] == {
            "externalPatientId": "pat_771",
            "externalAppointmentId": "apt_1029",
            "externalClinicId": "ext-9",
            "vet": {"name": "Dr. Ana Lópes", "externalStaffId": "stf_44"},
            "noteId": "note-1",
            "version": 1,
            "signedAt": "2026-06-12T14:55:00Z",
            "language": "fr",
        }
        assert envelope["occurredAt"] == "2026-06-12T15:00:00Z"

    def test_absent_meta_fields_omitted(self) -> None:
        envelope = build_envelope(_command(), hard_note(), external_clinic_id=None)

        for name in ("externalAppointmentId", "externalClinicId", "vet", "language"):
            assert name not in envelope["meta"]

    def test_formats_present(self) -> None:
        envelope = build_envelope(_command(), hard_note(), external_clinic_id=None)

        assert set(envelope["formats"]) == {"json", "text", "html"}
        assert "vitals" not in envelope["formats"]["json"]

    def test_narrative_only_formats(self) -> None:
        note = {"schemaVersion": "1.0"}
        command = SoapPush.model_validate(
            push_command("clinic-1", note=note, narrative="Seen & well.")
        )
        envelope = build_envelope(command, note, external_clinic_id=None)

        assert envelope["formats"]["text"] == {"narrative": "Seen & well."}
        assert "Seen &amp; well." in envelope["formats"]["html"]

    def test_nothing_captured_sends_json_only(self) -> None:
        note = {"schemaVersion": "1.0"}
        command = SoapPush.model_validate(push_command("clinic-1", note=note))
        envelope = build_envelope(command, note, external_clinic_id=None)

        assert envelope["formats"] == {"json": {"schemaVersion": "1.0"}}

    def test_id_stable_for_one_version(self) -> None:
        first = build_envelope(_command(), hard_note(), external_clinic_id=None)
        again = build_envelope(_command(), hard_note(), external_clinic_id=None)

        assert first["id"] == again["id"]
        assert first["id"] == str(envelope_id("clinic-1", "note-1", 1))
        assert encode_envelope(first) == encode_envelope(again)

    def test_id_differs_per_version_and_clinic(self) -> None:
        ids = {
            envelope_id("clinic-1", "note-1", 1),
            envelope_id("clinic-1", "note-1", 2),
            envelope_id("clinic-2", "note-1", 1),
            envelope_id("clinic-1", "note-2", 1),
        }

        assert len(ids) == 4
        assert all(isinstance(value, uuid.UUID) for value in ids)

    def test_id_parts_cannot_run_together(self) -> None:
        assert envelope_id("a/b", "c", 1) != envelope_id("a", "b/c", 1)

    def test_encoded_as_utf8(self) -> None:
        body = encode_envelope(
            build_envelope(_command(), hard_note(), external_clinic_id=None)
        )

        assert "食欲不振".encode() in body
        assert orjson.loads(body)["formats"]["json"]["subjective"]["fields"][2][
            "value"
        ].startswith("Mange moins")
