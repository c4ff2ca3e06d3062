"""The simulator's aiohttp application: PIMS-hosted routes plus /_sim control routes."""

from __future__ import annotations

from aiohttp import web

from pims_sim import control_routes, pims_routes
from pims_sim.fault_injection import with_faults
from pims_sim.http_common import MAX_BODY_BYTES, STATE_KEY, errors_middleware
from pims_sim.state import SimState

CONTROL_PREFIX = "/_sim"


def build_app(state: SimState) -> web.Application:
    """Build the application; run it with `web.AppRunner` or aiohttp's test server."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[STATE_KEY] = state

    base = state.config.normalized_base_path()
    app.router.add_get(
        f"{base}/species", with_faults("species", pims_routes.list_species)
    )
    app.router.add_get(
        f"{base}/patients", with_faults("patients", pims_routes.search_patients)
    )
    app.router.add_get(
        f"{base}/appointments",
        with_faults("appointments", pims_routes.list_appointments),
    )
    app.router.add_post(f"{base}/push", with_faults("push", pims_routes.receive_push))

    control = CONTROL_PREFIX
    app.router.add_get(f"{control}/health", control_routes.health)
    app.router.add_get(f"{control}/data", control_routes.show_data)
    app.router.add_get(f"{control}/pushes", control_routes.list_pushes)
    app.router.add_delete(f"{control}/pushes", control_routes.delete_pushes)
    app.router.add_get(f"{control}/faults", control_routes.list_faults)
    app.router.add_post(f"{control}/faults", control_routes.set_fault)
    app.router.add_delete(f"{control}/faults", control_routes.clear_faults)
    app.router.add_get(f"{control}/calls", control_routes.count_calls)
    app.router.add_delete(f"{control}/calls", control_routes.reset_calls)

    async def release_held_requests(_app: web.Application) -> None:
        state.stopping.set()

    app.on_shutdown.append(release_held_requests)
    return app
