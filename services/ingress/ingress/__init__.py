"""The Partner API ingress: authenticated, signed webhooks in, the outbox out."""
