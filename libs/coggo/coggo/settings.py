"""Process settings, read once from the environment at start."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment variables shared by every Coggo process."""

    model_config = SettingsConfigDict(env_prefix="COGGO_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/coggo"
    secret_key: SecretStr | None = Field(
        default=None,
        description="Key that encrypts signing secrets and PIMS credentials at rest.",
    )
    dev_mode: bool = Field(
        default=False,
        description="Allow start without COGGO_SECRET_KEY, using a fixed development key.",
    )
    ingress_host: str = "127.0.0.1"
    ingress_port: int = 8080
    metrics_port: int = Field(
        default=0,
        description="Side port of a worker's health and metrics server; 0 disables it.",
    )
    allow_private_targets: bool = False
    topology_prefix: str = Field(
        default="",
        description="Prefix of every exchange and queue name; tests isolate with it.",
    )
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = "info"
    db_pool_size: int = Field(default=10, ge=1, le=200)
    prefetch: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Messages a worker holds unacknowledged.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the settings of this process, read on first use."""
    return Settings()
