-- SOAP pushes to a clinic's PIMS, one row per (clinic, note, version), which
-- is the idempotency key. The row is the durable schedule of the push: the
-- dispatcher sends the attempts that are due and records each outcome here, so
-- a restart loses no attempt.

CREATE TABLE pushes (
    -- The envelope id: a uuid5 of (clinic, note, version), the same on every attempt.
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    note_id text NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sent', 'failed', 'superseded')),
    -- Attempts started so far; an attempt counts from the moment it is claimed.
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Set while an attempt is in flight. A dispatcher killed mid-attempt leaves
    -- it set, and the push becomes due again once this time has passed.
    leased_until timestamptz,
    last_status integer,
    last_error text,
    -- The soap.push command as received, kept until the push is finished and
    -- then cleared, so note content does not stay here longer than needed.
    command bytea,
    command_id text NOT NULL,
    command_headers jsonb NOT NULL DEFAULT '{}',
    superseded_by integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    UNIQUE (clinic_id, note_id, version)
);

-- Due attempts are claimed in order of next_attempt_at.
CREATE INDEX pushes_due ON pushes (next_attempt_at) WHERE state = 'pending';
