"""SOAP notes pushed to a PIMS: rendering and the push envelope."""
