"""Coggo's species and the names a PIMS uses for them."""

from __future__ import annotations

from collections.abc import Mapping

# Coggo species code -> names and common synonyms, compared after case folding.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "canine": (
        "canine",
        "dog",
        "k9",
        "k-9",
        "canis",
        "canis familiaris",
        "puppy",
        "hund",
        "perro",
        "chien",
    ),
    "feline": (
        "feline",
        "cat",
        "felis",
        "felis catus",
        "kitten",
        "kitty",
        "katze",
        "gato",
        "chat",
    ),
    "equine": (
        "equine",
        "horse",
        "equus",
        "pony",
        "mare",
        "stallion",
        "gelding",
        "foal",
        "donkey",
        "mule",
    ),
    "bovine": (
        "bovine",
        "cow",
        "cattle",
        "bull",
        "calf",
        "heifer",
        "steer",
        "bos taurus",
    ),
    "ovine": ("ovine", "sheep", "lamb", "ewe", "ram"),
    "caprine": ("caprine", "goat", "kid"),
    "porcine": ("porcine", "pig", "swine", "hog", "sow", "boar", "piglet"),
    "lagomorph": ("lagomorph", "rabbit", "bunny", "hare"),
    "avian": (
        "avian",
        "bird",
        "parrot",
        "budgie",
        "budgerigar",
        "cockatiel",
        "canary",
        "chicken",
        "poultry",
        "duck",
    ),
    "reptile": (
        "reptile",
        "lizard",
        "snake",
        "turtle",
        "tortoise",
        "gecko",
        "iguana",
        "bearded dragon",
    ),
    "rodent": (
        "rodent",
        "guinea pig",
        "cavy",
        "hamster",
        "rat",
        "mouse",
        "gerbil",
        "chinchilla",
    ),
    "ferret": ("ferret", "mustela furo"),
    "camelid": ("camelid", "alpaca", "llama", "camel"),
    "amphibian": ("amphibian", "frog", "toad", "salamander", "axolotl"),
    "fish": ("fish", "goldfish", "koi"),
}

_BY_NAME: dict[str, str] = {
    name.casefold(): code for code, names in SYNONYMS.items() for name in names
}


def fold(value: str) -> str:
    """Trim, collapse inner whitespace and case-fold, for comparing names."""
    return " ".join(value.split()).casefold()


def species_by_name(name: str | None) -> str | None:
    """Return the Coggo species for a free-text name or synonym, or None."""
    if not name:
        return None
    return _BY_NAME.get(fold(name))


def resolve_species(
    species_key: str | None,
    species_raw: str | None,
    species_map: Mapping[str, str | None],
) -> str | None:
    """Resolve a patient's species: the clinic's key mapping first, then the legacy name."""
    if species_key:
        mapped = species_map.get(species_key)
        if mapped:
            return mapped
    return species_by_name(species_raw)
