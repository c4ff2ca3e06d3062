-- Integrations, keys and signing secrets.

CREATE TABLE integrations (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL UNIQUE,
    provider text NOT NULL,
    external_clinic_id text,
    default_timezone text NOT NULL DEFAULT 'UTC',
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    plan_enabled boolean NOT NULL DEFAULT true,
    pims_base_url text,
    push_url text,
    pims_credentials bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE signing_secrets (
    id uuid PRIMARY KEY,
    integration_id uuid NOT NULL REFERENCES integrations (id) ON DELETE CASCADE,
    secret bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULL for the current secret; set to the end of the grace period on rotation.
    expires_at timestamptz
);
CREATE INDEX signing_secrets_integration ON signing_secrets (integration_id);

CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    integration_id uuid NOT NULL REFERENCES integrations (id) ON DELETE CASCADE,
    prefix text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    scopes text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

-- Generic cell rate algorithm state per key: the theoretical arrival time.
CREATE TABLE rate_limits (
    key_id uuid PRIMARY KEY,
    tat timestamptz NOT NULL
);

-- Accepted webhook deliveries; the unique pair is the idempotency key.
CREATE TABLE inbound_events (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    content_hash bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, event_id)
);

-- Transactional outbox: rows are written with the change they announce and
-- deleted once the broker has confirmed the publish.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    message_id text NOT NULL,
    body bytea NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    -- Work for our own queues must be routed; domain events on coggo.events
    -- go to whoever has bound a queue, possibly no one.
    mandatory boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Messages a consumer has finished, so a redelivery changes nothing.
CREATE TABLE processed_messages (
    consumer text NOT NULL,
    message_id text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Clinic records mirrored from the PIMS. `versions` maps each field to the
-- (occurredAt, event id) of the event that last wrote it, so that an older
-- event never overwrites a newer value, whatever order they arrive in.

CREATE TABLE clients (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    external_id text NOT NULL,
    first_name text,
    last_name text,
    email text,
    phone text,
    address_line1 text,
    address_line2 text,
    city text,
    state_region text,
    postal_code text,
    versions jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, external_id)
);

CREATE TABLE patients (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    external_id text NOT NULL,
    client_id uuid REFERENCES clients (id),
    external_client_id text,
    name text,
    species_key text,
    species_raw text,
    species text,
    species_resolved boolean NOT NULL DEFAULT false,
    breed text,
    color text,
    sex text,
    reproductive_status text,
    date_of_birth date,
    date_of_birth_estimated boolean NOT NULL DEFAULT false,
    weight_kg double precision,
    merged_into_id uuid REFERENCES patients (id),
    versions jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, external_id)
);
CREATE INDEX patients_client ON patients (client_id);

CREATE TABLE appointments (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    external_id text NOT NULL,
    patient_id uuid REFERENCES patients (id),
    starts_at_local timestamp,
    timezone text,
    starts_at timestamptz,
    duration_minutes integer,
    reason text,
    external_staff_id text,
    status text NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'cancelled')),
    versions jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, external_id)
);
CREATE INDEX appointments_patient ON appointments (patient_id);

CREATE TABLE visits (
    id uuid PRIMARY KEY,
    clinic_id text NOT NULL,
    appointment_id uuid NOT NULL UNIQUE REFERENCES appointments (id),
    patient_id uuid REFERENCES patients (id),
    status text NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    scheduled_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX visits_patient ON visits (patient_id);

-- The clinic's PIMS species catalog and its mapping to Coggo species.
CREATE TABLE species_map (
    clinic_id text NOT NULL,
    pims_key text NOT NULL,
    label text,
    species text,
    manual boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (clinic_id, pims_key)
);

CREATE TABLE breeds (
    clinic_id text NOT NULL,
    species text NOT NULL DEFAULT '',
    name text NOT NULL,
    folded text NOT NULL,
    PRIMARY KEY (clinic_id, species, folded)
);

CREATE TABLE colors (
    clinic_id text NOT NULL,
    name text NOT NULL,
    folded text NOT NULL,
    PRIMARY KEY (clinic_id, folded)
);
