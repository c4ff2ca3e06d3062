"""Reference PIMS: the Partner API's PIMS-hosted endpoints and a webhook sender."""
