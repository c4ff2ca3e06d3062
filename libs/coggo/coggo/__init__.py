"""Shared code of the Coggo PIMS integration services."""
