"""The simulated clinic's species, clients, patients and appointments.

Every record comes from `generate_clinic`, which is deterministic for one seed,
clinic timezone and start date. Records are the Partner API's own pydantic
models, so what the server returns is what the spec describes. Names, e-mail
addresses and phone numbers are fictional: phones use the 555-01xx range and
e-mail addresses the reserved example domains.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from coggo.schemas.partner import Appointment, Client, Patient

POUNDS_PER_KG = 1 / 0.45359237
MAX_SEARCH_RESULTS = 20
# The Partner API lets Coggo ask for appointments at most this many days ahead.
MAX_DAYS_AHEAD = 30


@dataclass(frozen=True)
class SpeciesProfile:
    """One entry of the species catalog and what generated patients of it look like."""

    key: str
    label: str
    legacy_names: tuple[str, ...]
    breeds: tuple[str, ...]
    colors: tuple[str, ...]
    weight_kg: tuple[float, float]
    max_age_years: int
    # Relative frequency among generated patients.
    share: int


# Labels are in the mixed case that PIMS catalogs really contain. Legacy names
# are what older PIMS versions send in `species` instead of `speciesKey`.
SPECIES: tuple[SpeciesProfile, ...] = (
    SpeciesProfile(
        key="1",
        label="Canine",
        legacy_names=("Dog", "canine", "K9"),
        breeds=(
            "Golden Retriever",
            "golden retriever ",
            "Labrador Retriever",
            "German Shepherd",
            "French Bulldog",
            "Beagle",
            "Border Collie",
            "Dachshund",
            "Cavalier King Charles Spaniel",
            "Mixed Breed",
        ),
        colors=("Black", "Golden", "Black & Tan", "Brindle", "Tricolor", "White"),
        weight_kg=(3.0, 45.0),
        max_age_years=15,
        share=45,
    ),
    SpeciesProfile(
        key="2",
        label="Feline",
        legacy_names=("Cat", "feline", "FELINE"),
        breeds=(
            "Domestic Shorthair",
            "DSH",
            "Maine Coon",
            "Siamese",
            "Ragdoll",
            "British Shorthair",
        ),
        colors=("Tabby", "Tortoiseshell", "Black", "Calico", "Grey", "Orange Tabby"),
        weight_kg=(2.5, 8.0),
        max_age_years=18,
        share=30,
    ),
    SpeciesProfile(
        key="3",
        label="rabbit",
        legacy_names=("Rabbit", "bunny"),
        breeds=("Holland Lop", "Netherland Dwarf", "Rex", "Lionhead"),
        colors=("White", "Agouti", "Broken Black", "Fawn"),
        weight_kg=(0.9, 4.5),
        max_age_years=10,
        share=6,
    ),
    SpeciesProfile(
        key="4",
        label="BIRD - Psittacine",
        legacy_names=("bird", "Parrot"),
        breeds=("Budgerigar", "Cockatiel", "African Grey", "Sun Conure"),
        colors=("Green", "Grey", "Yellow", "Blue"),
        weight_kg=(0.03, 0.5),
        max_age_years=30,
        share=5,
    ),
    SpeciesProfile(
        key="5",
        label="Reptile",
        legacy_names=("reptile", "Lizard", "snake"),
        breeds=("Bearded Dragon", "Leopard Gecko", "Ball Python", "Red-eared Slider"),
        colors=("Tan", "Spotted", "Banded", "Green"),
        weight_kg=(0.05, 2.5),
        max_age_years=20,
        share=4,
    ),
    SpeciesProfile(
        key="6",
        label="guinea pig",
        legacy_names=("Guinea Pig", "cavy"),
        breeds=("American", "Abyssinian", "Peruvian"),
        colors=("Tricolor", "Cream", "Agouti"),
        weight_kg=(0.7, 1.2),
        max_age_years=7,
        share=3,
    ),
    SpeciesProfile(
        key="7",
        label="Equine",
        legacy_names=("Horse", "EQUINE", "pony"),
        breeds=(
            "Quarter Horse",
            "Thoroughbred",
            "Arabian",
            "Haflinger",
            "Shetland Pony",
        ),
        colors=("Bay", "Chestnut", "Grey", "Palomino", "Black"),
        weight_kg=(180.0, 600.0),
        max_age_years=28,
        share=5,
    ),
    SpeciesProfile(
        key="8",
        label="Ferret",
        legacy_names=("ferret",),
        breeds=("Standard", "Angora"),
        colors=("Sable", "Albino", "Champagne"),
        weight_kg=(0.6, 2.0),
        max_age_years=9,
        share=2,
    ),
)
SPECIES_BY_KEY = {profile.key: profile for profile in SPECIES}

FIRST_NAMES = (
    "Zoë", "José", "Søren", "Chloé", "Björn", "Łukasz", "Siobhán", "Ana", "Emma",
    "Liam", "Olivia", "Noah", "Ava", "Mateo", "Mia", "Ethan", "Amelia", "Lucas",
    "Harper", "Aiden", "Élodie", "Mehmet", "Priya", "Kenji", "Fatima", "Dmitri",
    "Grace", "Tomás", "Ingrid", "Kwame",
)  # fmt: skip
LAST_NAMES = (
    "García", "Müller", "O'Brien", "Nguyễn", "Kowalski", "Smith", "Johnson",
    "Øvergaard", "Dupont", "Tanaka", "van der Berg", "Okafor", "Rossi", "Brown",
    "Wilson", "Martínez", "Schäfer", "Lee", "Patel", "Andersson", "Murphy",
    "Novak", "Hernández", "Kim", "Walker",
)  # fmt: skip
PET_NAMES = (
    "Luna", "Max", "Bella", "Charlie", "Biscuit", "Mochi", "Kiwi", "Ziggy", "Thor",
    "Nala", "Olive", "Peanut", "Rocky", "Daisy", "Oscar", "Chloé", "Pépite",
    "Zoë", "Мурка", "Барсик", "Ñandú", "Sir Wiggles", "Cleo", "Milo", "Pumpkin",
    "Juniper", "Bo", "Ruby", "Apollo", "Hazel", "Nacho", "Señor Bigotes",
)  # fmt: skip
STREETS = ("Vine St", "Main St", "Elm Ave", "Ludlow Ave", "Calle Ocho", "Oak Ct")
CITIES = (
    ("Cincinnati", "OH", "45220"),
    ("Covington", "KY", "41011"),
    ("Dayton", "OH", "45402"),
)
AREA_CODES = ("513", "859", "937")
STAFF_IDS = ("stf_44", "stf_45", "stf_51")
DURATIONS_MINUTES = (15, 20, 30, 30, 45, 60)
REASONS = (
    "Annual wellness exam",
    "Vaccines: DHPP booster",
    "Lameness re-check",
    "Dental cleaning",
    "Itchy skin, ear odor",
    "Post-op suture removal",
    "Vomiting since yesterday",
    "Weight loss",
    "Limping on left hind",
    "Senior bloodwork",
)
EQUINE_REASONS = ("Coggins test", "Hoof abscess follow-up", "Spring vaccines")

# The appointment, client and patient of the spec's example `appointment.created`
# event. The simulated clinic contains them so the example can be reconciled.
EXAMPLE_EVENT_ID = "evt_8f2c41"
EXAMPLE_APPOINTMENT: dict[str, Any] = {
    "externalId": "apt_1029",
    "startsAt": "2026-06-12T14:00:00",
    "timezone": "America/New_York",
    "reason": "Lameness re-check",
    "externalStaffId": "stf_44",
}
EXAMPLE_CLIENT: dict[str, Any] = {
    "externalId": "cli_553",
    "firstName": "Peggy",
    "lastName": "Bartl",
    "email": "peggy.bartl@example.com",
    "phone": "+15134041567",
}
EXAMPLE_PATIENT: dict[str, Any] = {
    "externalId": "pat_771",
    "name": "Sky",
    "speciesKey": "1",
    "breed": "Golden Retriever",
    "color": "Golden",
    "sex": "female",
    "reproductiveStatus": "spayed",
    "dateOfBirth": "2023-06-08",
    "weight": {"value": 11, "unit": "kg"},
}
EXAMPLE_START_TIME = time(14, 0)

# Fixed records that show the cases a PIMS integration must handle, whatever
# the seed: an owner with several pets, `age` instead of `dateOfBirth`, pounds,
# legacy `species` names (one unknown to any catalog) and the legacy `weightKg`.
SHOWCASE_CLIENTS: tuple[dict[str, Any], ...] = (
    {
        **EXAMPLE_CLIENT,
        "city": "Cincinnati",
        "stateRegion": "OH",
        "postalCode": "45202",
    },
    {
        "externalId": "cli_554",
        "firstName": "Ольга",
        "lastName": "Смирнова",
        "email": "olga.smirnova@example.org",
        "phone": "(513) 555-0187",
    },
)
SHOWCASE_PATIENTS: tuple[dict[str, Any], ...] = (
    {**EXAMPLE_PATIENT, "externalClientId": "cli_553"},
    {
        "externalId": "pat_772",
        "name": "Zoë",
        "speciesKey": "2",
        "breed": "Domestic Shorthair",
        "color": "Tortoiseshell",
        "sex": "female",
        "reproductiveStatus": "spayed",
        "age": {"value": 4, "unit": "years"},
        "weight": {"value": 9.5, "unit": "lb"},
        "externalClientId": "cli_553",
    },
    {
        "externalId": "pat_773",
        "name": "Мурка",
        "species": "cat",
        "color": "Tabby",
        "sex": "female",
        "reproductiveStatus": "intact",
        "age": {"value": 18, "unit": "months"},
        "weightKg": 4.2,
        "externalClientId": "cli_554",
    },
    {
        "externalId": "pat_774",
        "name": "Bjørn",
        "species": "Hedgehog",
        "sex": "male",
        "reproductiveStatus": "unknown",
        "age": {"value": 10, "unit": "weeks"},
        "weight": {"value": 0.45, "unit": "kg"},
        "externalClientId": "cli_554",
    },
)

FIRST_CLIENT_NUMBER = 600
FIRST_PATIENT_NUMBER = 800
FIRST_APPOINTMENT_NUMBER = 1030


@dataclass(frozen=True)
class ScheduledAppointment:
    """An appointment with its start as a UTC instant, for filtering by window."""

    appointment: Appointment
    starts_at_utc: datetime
    client_id: str
    patient_id: str


@dataclass
class Clinic:
    """All records of the simulated clinic, with the PIMS-hosted queries over them."""

    timezone: str
    clients: dict[str, Client]
    patients: list[Patient]
    appointments: list[ScheduledAppointment]
    _search_index: list[tuple[Patient, tuple[str, ...], str]] = field(
        init=False, repr=False
    )
    _patients_by_id: dict[str, Patient] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._search_index = [self._index_patient(patient) for patient in self.patients]
        self._patients_by_id = {
            patient.external_id: patient for patient in self.patients
        }

    def species_catalog(self) -> dict[str, list[dict[str, str]]]:
        """Build the body of GET /species."""
        return {
            "species": [
                {"key": profile.key, "label": profile.label} for profile in SPECIES
            ]
        }

    def patient_with_owner(self, patient: Patient) -> dict[str, Any]:
        """Build the spec's PatientWithOwner for one patient."""
        owner = self.clients[str(patient.external_client_id)]
        return {**patient.wire(), "owner": owner.wire()}

    def search_patients(
        self, query: str, limit: int | None = MAX_SEARCH_RESULTS
    ) -> list[dict[str, Any]]:
        """Find patients whose name or owner's name, e-mail or phone contains the query.

        Text matches ignore case and Unicode normalization form. A query made of
        at least 4 digits and phone punctuation also matches a phone number
        written with other punctuation, so "513-404-1567" finds "+15134041567".
        """
        folded = fold_text(query.strip())
        digits = re.sub(r"\D", "", query)
        is_phone_query = re.fullmatch(r"[\d\s+().-]+", query.strip()) is not None
        match_phone = len(digits) >= 4 and is_phone_query

        found: list[dict[str, Any]] = []
        for patient, texts, phone_digits in self._search_index:
            if limit is not None and len(found) >= limit:
                break
            matched = any(folded in text for text in texts)
            if not matched and match_phone:
                matched = digits in phone_digits
            if matched:
                found.append(self.patient_with_owner(patient))
        return found

    def upcoming_appointments(self, days: int, now: datetime) -> list[dict[str, Any]]:
        """List appointments that start within `days` days of `now`, earliest first."""
        end = now + timedelta(days=days)
        selected = [
            scheduled
            for scheduled in self.appointments
            if now <= scheduled.starts_at_utc < end
        ]
        selected.sort(key=lambda scheduled: scheduled.starts_at_utc)
        return [self.appointment_item(scheduled) for scheduled in selected]

    def appointment_item(self, scheduled: ScheduledAppointment) -> dict[str, Any]:
        """Build one `{appointment, client, patient}` item in the webhook shapes."""
        patient = self._patients_by_id[scheduled.patient_id]
        return {
            "appointment": scheduled.appointment.wire(),
            "client": self.clients[scheduled.client_id].wire(),
            "patient": patient.wire(),
        }

    def _index_patient(self, patient: Patient) -> tuple[Patient, tuple[str, ...], str]:
        owner = self.clients[str(patient.external_client_id)]
        full_name = f"{owner.first_name or ''} {owner.last_name or ''}"
        texts = (
            patient.name,
            owner.first_name,
            owner.last_name,
            full_name,
            owner.email,
        )
        folded = tuple(fold_text(text) for text in texts if text)
        phone_digits = re.sub(r"\D", "", owner.phone or "")
        return patient, folded, phone_digits


def fold_text(text: str) -> str:
    """Normalize text for case-insensitive matching (NFKC, then case folding)."""
    return unicodedata.normalize("NFKC", text).casefold()


def generate_clinic(
    seed: int,
    *,
    appointments: int = 20,
    clients: int = 30,
    timezone: str = "America/New_York",
    now: datetime | None = None,
) -> Clinic:
    """Generate the clinic's records for one seed.

    `now` (default: the current time) fixes the clinic's local date. Birth dates
    are counted back from that date, and appointments start on the days after
    it, spread evenly over the next 29 days, so all of them fall within
    `MAX_DAYS_AHEAD` days of `now`.
    """
    zone = ZoneInfo(timezone)
    current = now if now is not None else datetime.now(UTC)
    today = current.astimezone(zone).date()

    people = random.Random(f"pims-sim:{seed}:people")
    client_records = [Client.model_validate(record) for record in SHOWCASE_CLIENTS]
    patient_records = [Patient.model_validate(record) for record in SHOWCASE_PATIENTS]
    for number in range(FIRST_CLIENT_NUMBER, FIRST_CLIENT_NUMBER + clients):
        client = _generate_client(people, number)
        client_records.append(client)
        for _ in range(_pet_count(people)):
            patient_number = FIRST_PATIENT_NUMBER + len(patient_records)
            patient_records.append(
                _generate_patient(people, patient_number, client.external_id, today)
            )

    clinic = Clinic(
        timezone=timezone,
        clients={client.external_id: client for client in client_records},
        patients=patient_records,
        appointments=[],
    )
    schedule = random.Random(f"pims-sim:{seed}:appointments")
    clinic.appointments = [
        _generate_appointment(schedule, clinic, index, appointments, today, zone)
        for index in range(appointments)
    ]
    return clinic


def _pet_count(rng: random.Random) -> int:
    return rng.choices((1, 2, 3, 4), weights=(40, 35, 15, 10))[0]


def _ascii_slug(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return re.sub(r"[^a-z]", "", decomposed.encode("ascii", "ignore").decode().lower())


def _generate_client(rng: random.Random, number: int) -> Client:
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    record: dict[str, Any] = {
        "externalId": f"cli_{number}",
        "firstName": first,
        "lastName": last,
    }

    # Some clients have no e-mail address or phone number on file.
    if number % 7 != 3:
        local_part = f"{_ascii_slug(first)}.{_ascii_slug(last)}{number}"
        record["email"] = f"{local_part}@example.com"
    if number % 9 != 5:
        area = rng.choice(AREA_CODES)
        line = f"01{rng.randrange(100):02d}"
        phone_formats = (
            f"+1{area}555{line}",
            f"({area}) 555-{line}",
            f"{area}-555-{line}",
        )
        record["phone"] = phone_formats[number % 3]
    if number % 3 != 0:
        city, state, postal_code = rng.choice(CITIES)
        record["addressLine1"] = f"{rng.randrange(10, 9999)} {rng.choice(STREETS)}"
        record["city"] = city
        record["stateRegion"] = state
        record["postalCode"] = postal_code
    return Client.model_validate(record)


def _generate_patient(
    rng: random.Random, number: int, client_id: str, today: date
) -> Patient:
    profile = rng.choices(SPECIES, weights=[p.share for p in SPECIES])[0]
    record: dict[str, Any] = {
        "externalId": f"pat_{number}",
        "name": rng.choice(PET_NAMES),
        "externalClientId": client_id,
        "breed": rng.choice(profile.breeds),
        "color": rng.choice(profile.colors),
    }

    # One patient in five comes from an older PIMS version that sends a
    # free-text species name instead of the catalog key.
    if number % 5 == 2:
        record["species"] = rng.choice(profile.legacy_names)
    else:
        record["speciesKey"] = profile.key

    age_days = rng.randrange(21, profile.max_age_years * 365)
    record.update(_sex_and_status(rng, profile))
    record.update(_birth(number, age_days, today))
    record.update(_weight(rng, number, profile, age_days))
    return Patient.model_validate(record)


def _sex_and_status(rng: random.Random, profile: SpeciesProfile) -> dict[str, str]:
    # Birds and reptiles are rarely sexed, and almost never neutered.
    if profile.key in {"4", "5"}:
        if rng.random() < 0.5:
            return {"sex": "unknown", "reproductiveStatus": "unknown"}
        return {"sex": rng.choice(("male", "female")), "reproductiveStatus": "intact"}
    sex = rng.choice(("male", "female"))
    altered = "neutered" if sex == "male" else "spayed"
    return {"sex": sex, "reproductiveStatus": rng.choice((altered, altered, "intact"))}


def _birth(number: int, age_days: int, today: date) -> dict[str, Any]:
    # One patient in four has only an approximate age on file.
    if number % 4 != 1:
        return {"dateOfBirth": (today - timedelta(days=age_days)).isoformat()}
    if age_days < 120:
        return {"age": {"value": age_days // 7, "unit": "weeks"}}
    if age_days < 730:
        return {"age": {"value": age_days // 30, "unit": "months"}}
    return {"age": {"value": age_days // 365, "unit": "years"}}


def _weight(
    rng: random.Random, number: int, profile: SpeciesProfile, age_days: int
) -> dict[str, Any]:
    low, high = profile.weight_kg
    # Young animals weigh a fraction of the adult weight.
    growth = min(1.0, 0.15 + age_days / 365)
    kilograms = rng.uniform(low, high) * growth
    decimals = 2 if high < 5 else 1
    match number % 6:
        case 0 | 3:
            pounds = round(kilograms * POUNDS_PER_KG, decimals)
            return {"weight": {"value": pounds, "unit": "lb"}}
        case 4:
            return {"weightKg": round(kilograms, decimals)}
        case 5:
            return {}
        case _:
            return {"weight": {"value": round(kilograms, decimals), "unit": "kg"}}


def _generate_appointment(
    rng: random.Random,
    clinic: Clinic,
    index: int,
    total: int,
    today: date,
    zone: ZoneInfo,
) -> ScheduledAppointment:
    # Day 1 (tomorrow) to day 29, evenly spread, so every window of 1 to 30
    # days selects a predictable share of the appointments.
    day = today + timedelta(days=1 + (index * (MAX_DAYS_AHEAD - 1)) // total)

    if index == 0:
        patient = clinic.patients[0]
        record = {
            **EXAMPLE_APPOINTMENT,
            "startsAt": _local_iso(day, EXAMPLE_START_TIME),
            "timezone": clinic.timezone,
            "durationMinutes": 30,
            "status": "scheduled",
        }
        starts_local = datetime.combine(day, EXAMPLE_START_TIME, tzinfo=zone)
    else:
        patient = rng.choice(clinic.patients)
        start_time = time(rng.randrange(8, 17), rng.choice((0, 15, 30, 45)))
        is_equine = patient.species_key == "7"
        record = {
            "externalId": f"apt_{FIRST_APPOINTMENT_NUMBER + index - 1}",
            "startsAt": _local_iso(day, start_time),
            "timezone": clinic.timezone,
            "durationMinutes": rng.choice(DURATIONS_MINUTES),
            "reason": rng.choice(EQUINE_REASONS if is_equine else REASONS),
            "externalStaffId": rng.choice(STAFF_IDS),
            # A PIMS lists cancelled appointments too, with their status.
            "status": "cancelled" if index % 10 == 9 else "scheduled",
        }
        starts_local = datetime.combine(day, start_time, tzinfo=zone)

    return ScheduledAppointment(
        appointment=Appointment.model_validate(record),
        starts_at_utc=starts_local.astimezone(UTC),
        client_id=str(patient.external_client_id),
        patient_id=patient.external_id,
    )


def _local_iso(day: date, start_time: time) -> str:
    return datetime.combine(day, start_time).isoformat(timespec="seconds")
