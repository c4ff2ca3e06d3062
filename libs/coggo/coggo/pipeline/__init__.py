"""The patient-upsert pipeline shared by webhooks, reconciliation and imports."""
