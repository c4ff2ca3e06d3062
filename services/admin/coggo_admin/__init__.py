"""coggo-admin: the operator CLI for the database and integrations."""
