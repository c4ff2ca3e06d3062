"""Signed webhooks through the ingress, with this machine's ceilings beside them.

The run, all on loopback against servers it starts itself:

1. Ceilings, one at a time: a bare aiohttp handler that reads the body and
   returns 200 (same load generator, same number of processes as the
   ingress), persistent publishes with confirms into a quorum queue, and
   single-row inserts committed to PostgreSQL. The ingress rate is compared
   with 1 / (1/http + 1/insert + 1/publish), the ceiling of one request's work.
2. `coggo-ingress` processes sharing one port (SO_REUSEPORT), and integrations
   inserted directly into a fresh database.
3. Maximum rate: closed loop over keep-alive connections, patient-upsert not
   running, so the ingress has the machine to itself.
4. Latency at an offered 1,500 requests/s, open loop.
5. Two `coggo-patient-upsert` processes drain the queue. Then the ingress
   gets an offered 500 requests/s, and a queue bound to coggo.events times
   each visit.scheduled against the 200 of its request.
6. `lost`: accepted events minus those the consumer processed once the queues
   are empty.
7. Optional soak (COGGO_BENCH_INGRESS_SOAK_SECONDS): 500 requests/s with
   patient-upsert running, resident memory sampled every 10 s.

Every phase uses keys of its own, so no key sends more than 120 requests in
any 60 s and the rate limit never answers 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage
from coggo.credentials import (
    SecretBox,
    hash_api_key,
    key_prefix,
    new_api_key,
    new_signing_secret,
)
from coggo.settings import Settings

from tests.bench.common import BenchEnv, bench_env, environment
from tests.bench.load import Outcomes, appointment_id
from tests.bench.report import Section

SECONDS = float(os.environ.get("COGGO_BENCH_INGRESS_SECONDS", "60"))
CEILING_SECONDS = float(os.environ.get("COGGO_BENCH_INGRESS_CEILING_SECONDS", "10"))
PROCESSES = int(os.environ.get("COGGO_BENCH_INGRESS_PROCESSES", "2"))
SOAK_SECONDS = float(os.environ.get("COGGO_BENCH_INGRESS_SOAK_SECONDS", "0"))
PROFILE = os.environ.get("COGGO_BENCH_PROFILE")

CONSUMERS = 2
# The closed loop keeps this many requests in flight.
MAX_CONNECTIONS = 256
OPEN_LOOP_CONNECTIONS = 256
# Keys of the closed-loop phase are sized for up to this rate. A faster
# ingress runs out of requests before the phase ends and reports a shorter run.
MAX_RATE_CAP = 4000
LATENCY_RATE = 1500
END_TO_END_RATE = 500
SOAK_RATE = 500
REQUESTS_PER_KEY = 120
MIN_CLINICS = 500

TARGET_ACCEPTED = 2500
TARGET_P99_MS = 50
TARGET_END_TO_END_P99_MS = 250
TARGET_RSS_MIB = 150
TARGET_SOAK_GROWTH = 0.10

BIN = Path(sys.executable).parent


@dataclass
class Key:
    api_key: str
    secret: str


@dataclass
class PhaseResult:
    summary: dict[str, Any]
    outcomes: Outcomes
    # CPU use during the phase by group of processes, in percent of one core.
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(1 for status in self.outcomes.status if status == 200)

    @property
    def failed(self) -> int:
        non_2xx = sum(1 for status in self.outcomes.status if not 200 <= status < 300)
        return non_2xx + int(self.summary["unsent"]) + int(self.summary["unanswered"])

    @property
    def load_cpu(self) -> float:
        """The load generator's own CPU use, in percent of one core."""
        return float(self.summary["cpu_seconds"] / self.summary["seconds"] * 100)

    @property
    def accepted_per_second(self) -> float:
        return self.accepted / float(self.summary["seconds"])

    def latency_ms(self, quantile: float) -> float:
        latencies = sorted(
            done - due
            for done, due in zip(self.outcomes.done, self.outcomes.due, strict=True)
        )
        return percentile(latencies, quantile) * 1000


@dataclass
class Services:
    """The service processes of the run, with their stderr kept in files."""

    folder: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        self.processes[name] = process
        return process.pid

    def check(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.folder / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(
                    f"{name} exited with {process.returncode}: {tail[-2000:]}"
                )

    def stop(self, prefix: str = "") -> None:
        names = [name for name in self.processes if name.startswith(prefix)]
        for name in names:
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        for name in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.processes.pop(name).wait(30)

    def pids(self, prefix: str) -> list[int]:
        return [
            process.pid
            for name, process in self.processes.items()
            if name.startswith(prefix)
        ]

    def resident_mib(self) -> dict[str, float]:
        return {
            name: rss_kib(process.pid) / 1024
            for name, process in self.processes.items()
            if process.poll() is None
        }


class CpuMeter:
    """CPU time of groups of processes over one phase, from /proc/PID/stat.

    A process of a group that started during the phase counts in full.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.started = time.monotonic()
        self.before = {
            pid: _cpu_seconds(pid) for pids in groups.values() for pid in pids
        }

    def percent(self, groups: dict[str, list[int]]) -> dict[str, float]:
        """Each group's CPU use since the start, in percent of one core."""
        elapsed = time.monotonic() - self.started
        return {
            name: sum(_cpu_seconds(pid) - self.before.get(pid, 0.0) for pid in pids)
            / elapsed
            * 100
            for name, pids in groups.items()
        }


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime, fields 14 and 15 of proc(5), counted after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_named(command: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def backend_pids(connection: asyncpg.Connection) -> list[int]:
    """PostgreSQL backends connected to the benchmark's database, this one excluded."""
    rows = await connection.fetch(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [row["pid"] for row in rows]


def percentile(ordered: list[float], quantile: float) -> float:
    if not ordered:
        return math.nan
    rank = max(0, math.ceil(quantile * len(ordered)) - 1)
    return ordered[rank]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_for_port(port: int, services: Services, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        services.check()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on port {port} after {timeout} s"
                ) from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def create_keys(
    database_url: str, box: SecretBox, count: int, tag: str
) -> list[Key]:
    """Insert `count` integrations, each with one key and one signing secret."""
    keys: list[Key] = []
    integrations, secrets, api_keys = [], [], []
    for index in range(count):
        integration_id = uuid.uuid4()
        api_key, secret = new_api_key(), new_signing_secret()
        keys.append(Key(api_key, secret))
        integrations.append((integration_id, f"clinic-{tag}-{index}", "bench"))
        secrets.append((uuid.uuid4(), integration_id, box.encrypt(secret)))
        api_keys.append(
            (
                uuid.uuid4(),
                integration_id,
                key_prefix(api_key),
                hash_api_key(api_key),
                ["integration:read", "webhooks:write"],
            )
        )
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.copy_records_to_table(
                "integrations",
                records=integrations,
                columns=["id", "clinic_id", "provider"],
            )
            await connection.copy_records_to_table(
                "signing_secrets",
                records=secrets,
                columns=["id", "integration_id", "secret"],
            )
            await connection.copy_records_to_table(
                "api_keys",
                records=api_keys,
                columns=["id", "integration_id", "prefix", "key_hash", "scopes"],
            )
    finally:
        await connection.close()
    return keys


async def run_tool(*arguments: str) -> dict[str, Any]:
    """Run `python -m tests.bench.load ARGUMENTS` and return its JSON summary."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.load",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"tests.bench.load {arguments[0]} failed: {stderr.decode()[-2000:]}"
        )
    result: dict[str, Any] = orjson.loads(stdout.splitlines()[-1])
    return result


async def send_load(
    folder: Path,
    port: int,
    keys: list[Key],
    tag: str,
    *,
    seconds: float,
    requests: int,
    connections: int,
    rate: float | None,
    processes: Callable[[], Awaitable[dict[str, list[int]]]] | None = None,
) -> PhaseResult:
    spec_path = folder / f"load-{tag}.json"
    spec_path.write_bytes(
        orjson.dumps(
            {
                "host": "127.0.0.1",
                "port": port,
                "keys": [(key.api_key, key.secret) for key in keys],
                "tag": tag,
                "requests": requests,
                "seconds": seconds,
                "connections": connections,
                "rate": rate,
            }
        )
    )
    meter = CpuMeter(await processes()) if processes is not None else None
    summary = await run_tool("send", str(spec_path))
    cpu = meter.percent(await processes()) if meter and processes else {}
    result = PhaseResult(summary, read_outcomes(Path(f"{spec_path}.out")), cpu)
    load_cpu = summary["cpu_seconds"] / summary["seconds"] * 100
    print(
        f"    {tag}: {result.accepted} accepted in {summary['seconds']:.1f} s "
        f"({result.accepted_per_second:,.0f}/s), {result.failed} failed, "
        f"p50 {result.latency_ms(0.5):.1f} ms, p99 {result.latency_ms(0.99):.1f} ms, "
        f"load generator CPU {load_cpu:.0f}% of one core",
        flush=True,
    )
    if cpu:
        print(
            "    CPU in % of one core: "
            + ", ".join(f"{name} {percent:.0f}" for name, percent in cpu.items()),
            flush=True,
        )
    return result


def read_outcomes(path: Path) -> Outcomes:
    with open(path, "rb") as results:
        columns = pickle.load(results)  # noqa: S301 (written by this benchmark)
    return Outcomes(**columns)


def keys_for(rate: float, seconds: float) -> int:
    return max(MIN_CLINICS, math.ceil(rate * seconds / REQUESTS_PER_KEY))


async def measure_ceilings(env: BenchEnv, folder: Path, section: Section) -> float:
    """Measure and record the ceilings; return the combined ceiling of one request."""
    services = Services(folder)
    port = free_port()
    for index in range(PROCESSES):
        services.start(
            f"bare-{index}",
            [
                sys.executable,
                "-m",
                "tests.bench.load",
                "serve-bare",
                "--port",
                str(port),
                "--seconds",
                str(CEILING_SECONDS + 120),
            ],
            dict(os.environ),
        )
    try:
        await wait_for_port(port, services)
        dummy = [Key("cgk_live_bench", "whsec_bench")]
        bare = await send_load(
            folder,
            port,
            dummy,
            "bare",
            seconds=CEILING_SECONDS,
            requests=10_000_000,
            connections=MAX_CONNECTIONS,
            rate=None,
        )
    finally:
        services.stop()
    published = await run_tool(
        "publish", "--url", env.settings.amqp_url, "--seconds", str(CEILING_SECONDS)
    )
    inserted = await run_tool(
        "insert", "--url", env.database_url, "--seconds", str(CEILING_SECONDS)
    )
    http_rate = bare.accepted_per_second
    publish_rate = float(published["count"] / published["seconds"])
    insert_rate = float(inserted["count"] / inserted["seconds"])
    combined = 1 / (1 / http_rate + 1 / publish_rate + 1 / insert_rate)
    section.add("ceiling: bare aiohttp handler", http_rate, "requests/s")
    section.add("ceiling: confirmed quorum-queue publishes", publish_rate, "messages/s")
    section.add("ceiling: single-row committed inserts", insert_rate, "rows/s")
    section.add("ceiling: one request's work combined", combined, "requests/s")
    return combined


async def start_ingress(settings: Settings, services: Services, port: int) -> list[int]:
    env = environment(settings)
    env["COGGO_INGRESS_PORT"] = str(port)
    pids = [
        services.start(f"ingress-{index}", [str(BIN / "coggo-ingress")], env)
        for index in range(PROCESSES)
    ]
    await wait_for_port(port, services)
    return pids


def start_consumers(settings: Settings, services: Services) -> None:
    env = environment(settings)
    for index in range(CONSUMERS):
        services.start(f"upsert-{index}", [str(BIN / "coggo-patient-upsert")], env)


async def processed_count(connection: asyncpg.Connection) -> int:
    count = await connection.fetchval(
        "SELECT count(*) FROM processed_messages WHERE consumer = 'patient-upsert'"
    )
    return int(count)


async def processed_event_ids(connection: asyncpg.Connection) -> set[str]:
    rows = await connection.fetch(
        """
        SELECT e.event_id FROM inbound_events e
        JOIN processed_messages p
            ON p.message_id = e.id::text AND p.consumer = 'patient-upsert'
        """
    )
    return {row["event_id"] for row in rows}


async def wait_drained(connection: asyncpg.Connection, services: Services) -> None:
    """Wait until every stored event is processed and its domain events published.

    Each wait ends early when progress stops for 30 s.
    """
    stored = int(await connection.fetchval("SELECT count(*) FROM inbound_events"))
    done = await processed_count(connection)
    progress_at = time.monotonic()
    last_report = time.monotonic()
    while done < stored:
        await asyncio.sleep(0.5)
        services.check()
        now = await processed_count(connection)
        if now > done:
            progress_at = time.monotonic()
        done = now
        if time.monotonic() - progress_at > 30:
            break
        if time.monotonic() - last_report > 10:
            print(f"    draining: {done}/{stored} processed", flush=True)
            last_report = time.monotonic()

    # The domain events of the drained work wait in the outbox; a later phase
    # that times visit.scheduled must not queue behind them.
    waiting = int(await connection.fetchval("SELECT count(*) FROM outbox"))
    progress_at = time.monotonic()
    while waiting:
        await asyncio.sleep(0.5)
        services.check()
        now = int(await connection.fetchval("SELECT count(*) FROM outbox"))
        if now < waiting:
            progress_at = time.monotonic()
        waiting = now
        if time.monotonic() - progress_at > 30:
            break
        if time.monotonic() - last_report > 10:
            print(f"    publishing: {waiting} domain events waiting", flush=True)
            last_report = time.monotonic()


def accepted_event_ids(result: PhaseResult) -> set[str]:
    tag = result.summary["tag"]
    return {
        f"evt-{tag}-{index}"
        for index, status in zip(
            result.outcomes.index, result.outcomes.status, strict=True
        )
        if status == 200
    }


class ScheduledVisits:
    """Arrival times of visit.scheduled events, by appointment external id."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        data = orjson.loads(message.body).get("data", {})
        external_id = data.get("externalAppointmentId")
        if external_id is not None and external_id not in self.arrived:
            self.arrived[external_id] = time.monotonic()


def profile(pid: int, folder: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` for `seconds`, writing COGGO_BENCH_PROFILE."""
    assert PROFILE is not None
    return subprocess.Popen(
        [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            PROFILE,
            "--duration",
            str(int(seconds)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "py-spy.log", "wb"),
    )


async def soak(
    env: BenchEnv, folder: Path, services: Services, port: int, section: Section
) -> None:
    keys = await create_keys(
        env.database_url, SecretBox("bench-secret-key"), SOAK_RATE, "soak"
    )
    samples: list[dict[str, float]] = []

    async def sample() -> None:
        while True:
            samples.append(services.resident_mib())
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    try:
        # One request a second per key: 60 in any minute, under the limit of 120.
        result = await send_load(
            folder,
            port,
            keys,
            "soak",
            seconds=SOAK_SECONDS,
            requests=int(SOAK_RATE * SOAK_SECONDS),
            connections=OPEN_LOOP_CONNECTIONS,
            rate=SOAK_RATE,
        )
    finally:
        sampler.cancel()
    samples.append(services.resident_mib())
    # The first minute is warm-up: caches and pools fill, then memory should hold.
    baseline = samples[min(6, len(samples) - 1)]
    growth = max(
        (samples[-1][name] - baseline[name]) / baseline[name]
        for name in baseline
        if name in samples[-1] and baseline[name] > 0
    )
    largest = max(max(sample.values()) for sample in samples)
    section.add(
        f"soak {SOAK_SECONDS:.0f} s at {SOAK_RATE}/s: non-2xx",
        result.failed,
        "",
        "0",
        result.failed == 0,
    )
    section.add(
        "soak: largest resident memory",
        largest,
        "MiB",
        f"< {TARGET_RSS_MIB}",
        largest < TARGET_RSS_MIB,
    )
    section.add(
        "soak: largest growth after the first minute",
        f"{growth * 100:.1f}",
        "%",
        f"<= {TARGET_SOAK_GROWTH * 100:.0f}",
        growth <= TARGET_SOAK_GROWTH,
    )
    section.notes.append(
        "Soak samples of resident MiB every 10 s: "
        + "; ".join(
            f"{name} {samples[min(6, len(samples) - 1)].get(name, 0):.0f} -> {samples[-1].get(name, 0):.0f}"
            for name in sorted(samples[-1])
        )
    )


async def run() -> Section:
    load = os.getloadavg()
    section = Section(
        "ingress: signed appointment.created webhooks over HTTP",
        f"make bench ARGS=ingress  (COGGO_BENCH_INGRESS_SECONDS={SECONDS:g}, "
        f"COGGO_BENCH_INGRESS_PROCESSES={PROCESSES}, "
        f"COGGO_BENCH_INGRESS_SOAK_SECONDS={SOAK_SECONDS:g})",
    )
    print(
        f"    load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    box = SecretBox("bench-secret-key")
    with tempfile.TemporaryDirectory(prefix="coggo-bench-ingress-") as scratch:
        folder = Path(scratch)
        async with bench_env("ingress") as env:
            combined = await measure_ceilings(env, folder, section)
            await run_ingress(env, folder, box, section, combined)
    after = os.getloadavg()
    section.notes.append(
        f"Load average (1, 5, 15 min) before the run {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}; after it {after[0]:.2f}, {after[1]:.2f}, {after[2]:.2f}."
    )
    return section


async def run_ingress(
    env: BenchEnv, folder: Path, box: SecretBox, section: Section, combined: float
) -> None:
    max_keys = keys_for(MAX_RATE_CAP, SECONDS)
    latency_keys = keys_for(LATENCY_RATE, SECONDS)
    end_to_end_keys = keys_for(END_TO_END_RATE, SECONDS)
    keys = await create_keys(
        env.database_url, box, max_keys + latency_keys + end_to_end_keys, "load"
    )
    services = Services(folder)
    port = free_port()
    connection = await asyncpg.connect(env.database_url)
    amqp = await aio_pika.connect(env.settings.amqp_url)

    async def processes() -> dict[str, list[int]]:
        return {
            "ingress": services.pids("ingress"),
            "patient-upsert": services.pids("upsert"),
            "PostgreSQL backends": await backend_pids(connection),
            "RabbitMQ (whole broker)": pids_named("beam.smp"),
        }

    try:
        pids = await start_ingress(env.settings, services, port)
        profiler = profile(pids[0], folder, SECONDS) if PROFILE else None
        fastest = await send_load(
            folder,
            port,
            keys[:max_keys],
            "max",
            seconds=SECONDS,
            requests=max_keys * REQUESTS_PER_KEY,
            connections=MAX_CONNECTIONS,
            rate=None,
            processes=processes,
        )
        if profiler is not None:
            profiler.wait(60)
        steady = await send_load(
            folder,
            port,
            keys[max_keys : max_keys + latency_keys],
            "rate1500",
            seconds=SECONDS,
            requests=int(LATENCY_RATE * SECONDS),
            connections=OPEN_LOOP_CONNECTIONS,
            rate=LATENCY_RATE,
            processes=processes,
        )
        services.check()

        channel = await amqp.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(env.topology.events, routing_key="visit.scheduled")
        visits = ScheduledVisits()
        await queue.consume(visits.on_message, no_ack=True)

        start_consumers(env.settings, services)
        backlog = fastest.accepted + steady.accepted
        started = time.monotonic()
        await wait_drained(connection, services)
        print(
            f"    drained {backlog} events in {time.monotonic() - started:.0f} s",
            flush=True,
        )

        end_to_end = await send_load(
            folder,
            port,
            keys[max_keys + latency_keys :],
            "rate500",
            seconds=SECONDS,
            requests=int(END_TO_END_RATE * SECONDS),
            connections=OPEN_LOOP_CONNECTIONS,
            rate=END_TO_END_RATE,
            processes=processes,
        )
        await wait_drained(connection, services)
        await asyncio.sleep(1)
        accepted = set().union(
            *(accepted_event_ids(result) for result in (fastest, steady, end_to_end))
        )
        lost = len(accepted - await processed_event_ids(connection))
        memory = services.resident_mib()

        end_to_end_ms = sorted(
            (visits.arrived[appointment_id("rate500", index)] - done) * 1000
            for index, status, done in zip(
                end_to_end.outcomes.index,
                end_to_end.outcomes.status,
                end_to_end.outcomes.done,
                strict=True,
            )
            if status == 200 and appointment_id("rate500", index) in visits.arrived
        )
        missing = end_to_end.accepted - len(end_to_end_ms)

        record_figures(section, fastest, steady, end_to_end, end_to_end_ms, combined)
        section.add("visit.scheduled not seen", missing, "", "0", missing == 0)
        section.add("lost (accepted, not processed)", lost, "", "0", lost == 0)
        largest = max(memory.values())
        section.add(
            "largest service resident memory",
            largest,
            "MiB",
            f"< {TARGET_RSS_MIB}",
            largest < TARGET_RSS_MIB,
        )
        section.notes.append(
            "Resident MiB after the run: "
            + ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(memory.items()))
        )
        section.notes.append(
            f"{PROCESSES} coggo-ingress processes share the port with SO_REUSEPORT; "
            f"{CONSUMERS} coggo-patient-upsert processes, started after the first two "
            "phases. The load generator is `python -m tests.bench.load` in its own "
            "process (uvloop, raw HTTP/1.1 on keep-alive connections); open-loop "
            "latency counts from each request's scheduled send time."
        )
        section.notes.append(
            f"Keys: {max_keys} for the closed loop (at most {REQUESTS_PER_KEY} requests "
            f"each, enough for {MAX_RATE_CAP}/s), {latency_keys} at {LATENCY_RATE}/s and "
            f"{end_to_end_keys} at {END_TO_END_RATE}/s, each its own clinic."
        )
        for result in (fastest, steady, end_to_end):
            section.notes.append(
                f"CPU during {result.summary['tag']}, in % of one core: "
                + ", ".join(f"{name} {value:.0f}" for name, value in result.cpu.items())
                + f", load generator {result.load_cpu:.0f}."
            )
        if SOAK_SECONDS > 0:
            await soak(env, folder, services, port, section)
    finally:
        services.stop("ingress")
        services.stop()
        await amqp.close()
        await connection.close()


def record_figures(
    section: Section,
    fastest: PhaseResult,
    steady: PhaseResult,
    end_to_end: PhaseResult,
    end_to_end_ms: list[float],
    combined: float,
) -> None:
    rate = fastest.accepted_per_second
    section.add(
        f"accepted, closed loop over {MAX_CONNECTIONS} connections",
        rate,
        "requests/s",
        f">= {TARGET_ACCEPTED}",
        rate >= TARGET_ACCEPTED,
    )
    section.add("  ratio to the combined ceiling", round(rate / combined, 2))
    section.add("  p50 latency", fastest.latency_ms(0.5), "ms")
    section.add("  p99 latency", fastest.latency_ms(0.99), "ms")
    section.add("  non-2xx", fastest.failed, "", "0", fastest.failed == 0)
    section.add(
        "  load generator CPU",
        fastest.summary["cpu_seconds"] / fastest.summary["seconds"] * 100,
        "% of one core",
    )
    section.add(
        f"offered {LATENCY_RATE}/s: accepted", steady.accepted_per_second, "requests/s"
    )
    p99 = steady.latency_ms(0.99)
    section.add("  p50 latency", steady.latency_ms(0.5), "ms")
    section.add("  p99 latency", p99, "ms", f"<= {TARGET_P99_MS}", p99 <= TARGET_P99_MS)
    section.add("  non-2xx", steady.failed, "", "0", steady.failed == 0)
    section.add(
        f"offered {END_TO_END_RATE}/s: accepted",
        end_to_end.accepted_per_second,
        "requests/s",
    )
    section.add("  p50 latency", end_to_end.latency_ms(0.5), "ms")
    section.add("  p99 latency", end_to_end.latency_ms(0.99), "ms")
    section.add("  non-2xx", end_to_end.failed, "", "0", end_to_end.failed == 0)
    section.add("  200 to visit.scheduled p50", percentile(end_to_end_ms, 0.5), "ms")
    tail = percentile(end_to_end_ms, 0.99)
    section.add(
        "  200 to visit.scheduled p99",
        tail,
        "ms",
        f"<= {TARGET_END_TO_END_P99_MS}",
        tail <= TARGET_END_TO_END_P99_MS,
    )
