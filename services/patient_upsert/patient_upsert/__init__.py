"""The patient-upsert consumer: PIMS events into clients, patients and visits."""
