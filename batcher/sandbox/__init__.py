"""A local RunComfy-compatible server, for rehearsals (``run --sandbox``) and the test suite.

Nothing in a real run imports it (a contract in pyproject.toml checks this): a
rehearsal's engine gets it as a `batcher.engine.endpoint.LocalApi` from
`batcher.run_manifest` or the CLI.

- `config`: every setting, with its flag; `server`: the fake service (`Sandbox`: requests in, answers out) and
  `SandboxConfig`, the settings made servable;
- `wire`: HTTP/1.1 on h11 and anyio, with the faults below HTTP (reset, slow, cut short);
- `dialects`: how it words answers (RunComfy's, and the variants its clients meet);
- `faults`: which faults it injects; `png`: its deterministic outputs; `thread`: it on a thread of its own.
"""

from .server import Sandbox, SandboxConfig
from .thread import SandboxThread

__all__ = ["Sandbox", "SandboxConfig", "SandboxThread"]
