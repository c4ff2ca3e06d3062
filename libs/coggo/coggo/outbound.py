"""Outbound HTTP to a clinic's PIMS, guarded against reaching internal addresses.

Every call has a timeout, follows no redirect and reads at most a fixed number
of response bytes. Unless private targets are allowed (tests, the local demo),
the URL must be HTTPS and every address the call could connect to must be a
global one: loopback, private, link-local (which contains the cloud metadata
address 169.254.169.254), CGNAT, multicast, reserved and unspecified addresses
are refused. The check runs on the addresses the resolver returns, which are
the ones aiohttp connects to, so DNS rebinding, IPv4-mapped IPv6 literals
such as [::ffff:127.0.0.1] and numeric forms such as 2130706433 or 0x7f000001
are refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from multidict import CIMultiDictProxy
from yarl import URL

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024


class OutboundBlocked(Exception):
    """The target of an outbound call is not allowed; nothing was sent."""


class ResponseTooLarge(Exception):
    """The response body exceeded the number of bytes the caller reads."""


def is_allowed_address(address: str) -> bool:
    """Return True when `address` is a global unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves names and rejects the call if any resolved address is not global."""

    def __init__(self) -> None:
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            if not is_allowed_address(result["host"]):
                raise OutboundBlocked(
                    f"{host} resolves to a non-public address; outbound calls to "
                    "loopback, private, link-local and metadata addresses are refused"
                )
        return results

    async def close(self) -> None:
        await self._resolver.close()


@dataclass(frozen=True)
class OutboundResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class OutboundClient:
    """An HTTP client for calls to a PIMS, with the guard described above."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        limit_per_host: int = 20,
    ) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=None if self.allow_private else GuardedResolver(),
                limit=0,
                limit_per_host=self._limit_per_host,
                ttl_dns_cache=None if self.allow_private else 0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False
            )
        return self._session

    def check_url(self, url: str) -> URL:
        """Reject a URL this client must not call, before anything is sent."""
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise OutboundBlocked(
                f"URL must be http(s) with a host, got scheme {parsed.scheme!r}"
            )
        if self.allow_private:
            return parsed
        if parsed.scheme != "https":
            raise OutboundBlocked("outbound calls must use HTTPS")
        host = parsed.host.strip("[]")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return parsed  # a name: the resolver checks what it resolves to
        if not is_allowed_address(host):
            raise OutboundBlocked(
                f"{host} is not a public address; outbound calls to loopback, "
                "private, link-local and metadata addresses are refused"
            )
        return parsed

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        max_response_bytes: int | None = None,
        truncate: bool = False,
    ) -> OutboundResponse:
        """Send one request; raise OutboundBlocked, ResponseTooLarge or aiohttp errors.

        With `truncate`, a body over the cap is cut instead of raising, for
        callers that only need the status.
        """
        target = self.check_url(url)
        limit = max_response_bytes or self.max_response_bytes
        budget = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with self._get_session().request(
                method,
                target,
                data=data,
                headers=headers,
                params=params,
                allow_redirects=False,
                timeout=budget,
            ) as response:
                body = await response.content.read(limit + 1)
                if len(body) > limit:
                    if not truncate:
                        raise ResponseTooLarge(
                            f"response from {target.host} is over {limit} bytes"
                        )
                    body = body[:limit]
                return OutboundResponse(response.status, response.headers, body)
        except aiohttp.InvalidURL as exc:
            raise OutboundBlocked(
                f"URL is not valid for an outbound call: {exc}"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, OutboundBlocked):
                raise exc.os_error from None
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)
            self._session = None
