-- The rate-limit state is disposable: after a crash PostgreSQL empties an
-- UNLOGGED table, which only gives every key its full allowance again, and
-- standbys do not have the rows. In exchange, a rate-limit update writes no
-- WAL, so it neither waits for a WAL flush nor adds to replication traffic.
ALTER TABLE rate_limits SET UNLOGGED;
