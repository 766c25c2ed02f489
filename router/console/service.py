"""The console's components, built once in the router's lifespan and kept on the router's state."""

from __future__ import annotations

from dataclasses import dataclass

from qvl.settings import ConsoleSettings
from router.console.autoscaling import AutoscalerStatus
from router.console.live import Live
from router.console.session import Sessions


@dataclass(slots=True)
class Console:
    settings: ConsoleSettings
    sessions: Sessions
    live: Live
    autoscaling: AutoscalerStatus | None = None
    """Reads the autoscaler's status from the registry's Redis; None without a registry."""

    async def close(self) -> None:
        """Close what holds connections (at the router's shutdown)."""
        if self.autoscaling is not None:
            await self.autoscaling.close()
