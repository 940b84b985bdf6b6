"""A local RunComfy-compatible server, for rehearsals (``run --sandbox``) and the test suite.

Nothing in a real run imports it (a contract in pyproject.toml checks this): a
rehearsal's engine gets it as a `batcher.engine.endpoint.LocalApi` from
`batcher.run_manifest` or the CLI.
"""

from .server import Sandbox, SandboxConfig, SandboxThread

__all__ = ["Sandbox", "SandboxConfig", "SandboxThread"]
