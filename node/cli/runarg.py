"""The click type of every run-ID argument: 64 hex characters or a unique prefix (`intellect.node.app.runid`).

Only the spelling is checked when the command line is parsed; which run a prefix names is decided against
the runs in the DHT by the command that needs it (`resolve_in_dht` for the short-lived client commands,
`app.body.pick_run` for `start`).
"""

from __future__ import annotations

from typing import Any

import click
from intellect.node.app.runid import RunIdError, check_prefix, is_full, resolve


class RunIdPrefix(click.ParamType):
    name = "run_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_prefix(str(value))
        except RunIdError as e:
            self.fail(str(e), param, ctx)


RUN_ID = RunIdPrefix()


async def resolve_in_dht(svc: Any, prefix: str) -> str:
    """The full run ID `prefix` names among the verifiable runs the DHT client `svc` sees (a full ID is
    taken as it is: its manifest may have expired while its members still train); ClickException if none
    or several match."""
    if is_full(prefix):
        return prefix
    runs, _ = await svc.get_manifests(latest=True)
    try:
        return resolve(prefix, (r.run_id for r in runs))
    except RunIdError as e:
        raise click.ClickException(str(e)) from None
