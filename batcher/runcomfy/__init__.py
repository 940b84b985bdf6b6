"""RunComfy's Model API as its own clients speak it: the calls, what each answer means, and how fast to call.

`client.RunComfyClient` makes the calls (submit, status, result, cancel); `answers`
reads an answer as untrusted bytes; `results` and `refusals` say what it means (a
submit is accepted, certainly refused or unknown: never resent on a guess);
`pacing`, `backpressure` and `polling` decide when the next call goes; `tokens` holds
the accounts' tokens; `account` asks for the balance and the live price.
"""

from .client import RunComfyClient

__all__ = ["RunComfyClient"]
