-- Runs of the reconciliation worker: appointment reconciliations and species
-- refreshes, one row per command received.
--
-- `command_id` is the id of the command message, so a redelivered command
-- finds its run and is not run again. Only one run per clinic and kind is
-- active at a time; the worker enforces that with a PostgreSQL advisory lock
-- (released when its connection closes, even after a crash), and `status`
-- records the outcome.
CREATE TABLE reconcile_runs (
    id uuid PRIMARY KEY,
    command_id text NOT NULL UNIQUE,
    clinic_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('appointments', 'species')),
    -- running: in progress; succeeded: the PIMS responded and the run finished;
    -- failed: the PIMS call failed or the run was interrupted; rejected: the
    -- command or the integration made the run impossible, and nothing was
    -- called; skipped: another run for the clinic was active.
    status text NOT NULL
        CHECK (status IN ('running', 'succeeded', 'failed', 'rejected', 'skipped')),
    days integer,
    fetched integer,
    processed integer,
    skipped integer,
    truncated integer,
    error text,
    detail text,
    -- The data of the reconcile.completed or species.refreshed event.
    result jsonb NOT NULL DEFAULT '{}',
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX reconcile_runs_clinic ON reconcile_runs (clinic_id, kind, started_at DESC);
CREATE INDEX reconcile_runs_running ON reconcile_runs (clinic_id, kind)
    WHERE status = 'running';
