"""The reconciliation worker: appointments, species and patient search from each PIMS."""
