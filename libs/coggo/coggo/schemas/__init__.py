"""Wire schemas: the Partner API (partner.py) and the bus messages (bus.py)."""
