"""Plain-text and HTML renderings of a SOAP note, and the vitals rule.

The Partner API marks a field with no captured data by the value
"Not mentioned" (free text and select) or "" (checkbox groups). An empty list
counts as not captured too. Only captured fields are rendered, and a section
without any is left out. A note with no captured section but a narrative is
rendered as the narrative alone.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coggo.schemas.partner import SoapField, SoapJson, SoapSection

NOT_MENTIONED = "Not mentioned"
SECTION_KEYS = ("subjective", "objective", "assessment", "plan")
SECTION_TITLES = {
    "subjective": "Subjective",
    "objective": "Objective",
    "assessment": "Assessment",
    "plan": "Plan",
}
NARRATIVE_KEY = "narrative"
# The only vitals key that is not a vital: it does not make the node present.
VITALS_CONFIDENCE_KEY = "confidence"


def is_blank(text: str) -> bool:
    """Return True for "", whitespace and the "Not mentioned" marker, in any case."""
    stripped = text.strip()
    return not stripped or stripped.casefold() == NOT_MENTIONED.casefold()


def format_number(value: float) -> str:
    """Format a number the way it was written: 11.0 as "11", 36.89 as "36.89"."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_field_value(field: SoapField) -> str | None:
    """Return the field's value as display text, or None when nothing was captured."""
    value = field.value
    if isinstance(value, list):
        items = [item.strip() for item in value if not is_blank(item)]
        return ", ".join(items) if items else None

    if isinstance(value, float):
        text = format_number(value)
    elif is_blank(value):
        return None
    else:
        text = value.strip()

    unit = (field.unit or "").strip()
    if field.type == "number_with_unit" and unit and not text.endswith(unit):
        text = f"{text} {unit}"
    return text


def captured_fields(section: SoapSection | None) -> list[tuple[str, str]]:
    """Return (label, value text) for every captured field of a section."""
    if section is None:
        return []
    found = []
    for field in section.fields:
        text = format_field_value(field)
        if text is not None:
            label = field.label.strip() or field.name
            found.append((label, text))
    return found


def captured_sections(note: SoapJson) -> dict[str, list[tuple[str, str]]]:
    """Return the captured fields of each section that has any, in SOAP order."""
    sections = {}
    for key in SECTION_KEYS:
        fields = captured_fields(getattr(note, key))
        if fields:
            sections[key] = fields
    return sections


def narrative_text(narrative: str | None) -> str | None:
    """Return the narrative without surrounding blank space, or None if it is blank."""
    if narrative is None or is_blank(narrative):
        return None
    return narrative.strip()


@dataclass(frozen=True)
class CapturedNote:
    """Captured content of a note, in the form both renderings use."""

    # Section key -> (label, value text) of each captured field, in SOAP order.
    sections: dict[str, list[tuple[str, str]]]
    # Section key -> heading: the note's section title, or the SOAP name.
    titles: dict[str, str]
    # Set only when no section has captured data.
    narrative: str | None


def capture_note(note: SoapJson, narrative: str | None = None) -> CapturedNote:
    """Collect the captured fields of a note, or its narrative when it has none."""
    sections = captured_sections(note)
    titles = {}
    for key in sections:
        section = getattr(note, key)
        titles[key] = section.title.strip() or SECTION_TITLES[key]
    return CapturedNote(
        sections=sections,
        titles=titles,
        narrative=None if sections else narrative_text(narrative),
    )


def text_blocks(captured: CapturedNote) -> dict[str, str]:
    """Render one plain-text block per captured section, or the narrative alone.

    Each block has one "Label: value" line per captured field. The result is
    empty when the note has neither captured fields nor a narrative.
    """
    if captured.sections:
        return {
            key: "\n".join(f"{label}: {value}" for label, value in fields)
            for key, fields in captured.sections.items()
        }
    if captured.narrative is not None:
        return {NARRATIVE_KEY: captured.narrative}
    return {}


def _escape_multiline(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "<br>".join([html.escape(line, quote=True) for line in lines])


def html_fragment(captured: CapturedNote) -> str:
    """Render a compact HTML fragment (no doctype, head or body) of the note.

    Every title, label and value is escaped with `html.escape`, and line breaks
    within a value become <br>. Captured sections become a <section> with a
    heading and a definition list; a narrative-only note becomes paragraphs.
    The result is "" when nothing was captured.
    """
    parts: list[str] = []
    for key, fields in captured.sections.items():
        rows = "".join(
            [
                f"<dt>{html.escape(label, quote=True)}</dt>"
                f"<dd>{_escape_multiline(value)}</dd>"
                for label, value in fields
            ]
        )
        title = html.escape(captured.titles[key], quote=True)
        parts.append(
            f'<section data-section="{key}"><h3>{title}</h3><dl>{rows}</dl></section>'
        )

    if not parts:
        if captured.narrative is None:
            return ""
        paragraphs = [
            paragraph.strip()
            for paragraph in captured.narrative.replace("\r\n", "\n").split("\n\n")
            if paragraph.strip()
        ]
        body = "".join([f"<p>{_escape_multiline(p)}</p>" for p in paragraphs])
        parts.append(f'<section data-section="{NARRATIVE_KEY}">{body}</section>')

    return f'<div class="coggo-soap">{"".join(parts)}</div>'


def render_text(note: SoapJson, narrative: str | None = None) -> dict[str, str]:
    """Render the plain-text blocks of a note; see `text_blocks`."""
    return text_blocks(capture_note(note, narrative))


def render_html(note: SoapJson, narrative: str | None = None) -> str:
    """Render the HTML fragment of a note; see `html_fragment`."""
    return html_fragment(capture_note(note, narrative))


def _is_captured_vital(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, str):
        return not is_blank(value)
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        # temperature: {value, unit, raw}; the unit alone is not a reading.
        return any(
            _is_captured_vital(item) for key, item in value.items() if key != "unit"
        )
    if isinstance(value, list):
        return any(_is_captured_vital(item) for item in value)
    return False


def has_captured_vitals(vitals: Mapping[str, Any] | None) -> bool:
    """Return True when at least one vital other than `confidence` was captured.

    An empty string means that vital was not captured, as the Partner API
    states; "Not mentioned" is treated the same way.
    """
    if not vitals:
        return False
    return any(
        _is_captured_vital(value)
        for key, value in vitals.items()
        if key != VITALS_CONFIDENCE_KEY
    )


def note_for_push(note: Mapping[str, Any]) -> dict[str, Any]:
    """Return the note as sent in `formats.json`: unchanged, but without an empty `vitals`.

    The Partner API sends the `vitals` node only when at least one vital was
    captured; Coggo's extraction confidence alone does not count.
    """
    pushed = dict(note)
    vitals = pushed.get("vitals")
    if "vitals" in pushed and not (
        isinstance(vitals, Mapping) and has_captured_vitals(vitals)
    ):
        del pushed["vitals"]
    return pushed
