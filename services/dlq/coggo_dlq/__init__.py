"""coggo-dlq: list, show, replay and purge dead-lettered messages."""
