"""coggo-admin species: a clinic's map from PIMS species keys to Coggo species.

The map is filled from the PIMS catalog (GET /species) and completed by hand.
A hand-made entry is marked manual, so a later catalog refresh keeps it. After
a mapping, patients that arrived with that key and stayed unresolved are
resolved at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from coggo.pipeline.species import SYNONYMS, species_by_name
from coggo.pipeline.upsert import resolve_pending_species
from coggo.settings import get_settings
from coggo.topology import Topology

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    database,
    emit,
    find_integration,
    timestamp,
)


async def species_list(args: argparse.Namespace) -> int:
    async with database() as connection:
        await find_integration(connection, args.clinic_id)
        rows = await connection.fetch(
            """
            SELECT m.pims_key, m.label, m.species, m.manual, m.updated_at,
                   (SELECT count(*) FROM patients p
                    WHERE p.clinic_id = m.clinic_id AND p.species_key = m.pims_key
                      AND NOT p.species_resolved) AS waiting
            FROM species_map m WHERE m.clinic_id = $1
            ORDER BY m.pims_key
            """,
            args.clinic_id,
        )
        unknown_keys = await connection.fetch(
            """
            SELECT species_key, count(*) AS waiting FROM patients p
            WHERE clinic_id = $1 AND species_key IS NOT NULL AND NOT species_resolved
              AND NOT EXISTS (SELECT 1 FROM species_map m
                              WHERE m.clinic_id = p.clinic_id AND m.pims_key = p.species_key)
            GROUP BY species_key ORDER BY species_key
            """,
            args.clinic_id,
        )
    entries = [
        {
            "key": row["pims_key"],
            "label": row["label"],
            "species": row["species"],
            "manual": row["manual"],
            "waitingPatients": row["waiting"],
            "updatedAt": timestamp(row["updated_at"]),
        }
        for row in rows
        if not args.unmapped or row["species"] is None
    ]
    # Keys that patients carry but the catalog does not list yet.
    entries += [
        {
            "key": row["species_key"],
            "label": None,
            "species": None,
            "manual": False,
            "waitingPatients": row["waiting"],
            "updatedAt": None,
        }
        for row in unknown_keys
    ]
    lines = [
        f"{entry['key']:<12} {entry['label'] or '-':<24} "
        f"{entry['species'] or '(unmapped)':<12} "
        f"{'manual' if entry['manual'] else '      '} "
        f"{entry['waitingPatients']} waiting"
        for entry in entries
    ]
    emit(
        args,
        {"clinicId": args.clinic_id, "species": entries},
        lines or [f"clinic {args.clinic_id} has no species keys yet"],
    )
    return 0


def coggo_species(name: str) -> str:
    """Return the Coggo species code for a code or a common name, or fail."""
    species = species_by_name(name)
    if species is None:
        raise AdminError(
            f"unknown species {name!r}: choose one of {', '.join(sorted(SYNONYMS))}"
        )
    return species


async def species_map(args: argparse.Namespace) -> int:
    species = coggo_species(args.species)
    key = args.key.strip()
    if not key:
        raise AdminError("--key is empty: give the PIMS species key, e.g. 7")
    async with database() as connection:
        await find_integration(connection, args.clinic_id)
        async with connection.transaction():
            await connection.execute(
                """
                INSERT INTO species_map (clinic_id, pims_key, species, manual)
                VALUES ($1, $2, $3, true)
                ON CONFLICT (clinic_id, pims_key)
                DO UPDATE SET species = EXCLUDED.species, manual = true, updated_at = now()
                """,
                args.clinic_id,
                key,
                species,
            )
            # The patients resolved here are announced like any other change;
            # a running service's outbox relay publishes the events.
            events = Topology(get_settings().topology_prefix).events
            resolved = await resolve_pending_species(connection, args.clinic_id, events)
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "key": key,
            "species": species,
            "manual": True,
            "patientsResolved": resolved,
        },
        [
            f"PIMS species key {key} of clinic {args.clinic_id} maps to {species}; "
            f"{resolved} patients resolved"
        ],
    )
    return 0


def register(groups: Any) -> None:
    species = groups.add_parser(
        "species",
        help="species map",
        description="List and complete the clinic's map from PIMS species keys "
        "to Coggo species.",
    )
    verbs = species.add_subparsers(dest="verb", required=True, metavar="VERB")

    listing = verbs.add_parser(
        "list",
        help="list PIMS species keys, their Coggo species and waiting patients",
    )
    listing.add_argument(
        "--unmapped", action="store_true", help="list only keys without a species"
    )
    listing.set_defaults(run=species_list)

    mapping = verbs.add_parser(
        "map",
        help="map a PIMS species key to a Coggo species by hand and resolve the "
        "patients waiting for it",
    )
    mapping.add_argument("--key", required=True, help="the PIMS species key, e.g. 7")
    mapping.add_argument(
        "--species",
        required=True,
        help=f"Coggo species or a common name for it: {', '.join(sorted(SYNONYMS))}",
    )
    mapping.set_defaults(run=species_map)

    for verb in (listing, mapping):
        add_clinic_argument(verb)
        add_json_flag(verb)
