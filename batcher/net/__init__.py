"""How batcher talks HTTP, to whoever: which URLs it may reach, redirects checked hop by hop, retries, the transport.

Nothing here knows RunComfy: `batcher.runcomfy` (the API) and `batcher.output.download`
(output files) both stand on it.

- `policy`: which URLs and addresses are allowed (https, loopback only for a local API, no private hosts).
- `redirects`: a redirect someone else named, followed by hand with every hop checked.
- `retrying`: when a failed call is tried again, and after how long (backoff, full jitter, Retry-After).
- `transport`: httpx2's transport with every connection kept alive.
"""
