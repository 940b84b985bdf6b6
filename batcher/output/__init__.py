"""Where a run's files go: the output folder or bucket, downloads into it, and the places runs went before.

`folders` finds a manifest's folder and its shards; `download` fetches outputs
(streamed, checked, atomic; `groupsync` fsyncs them in groups); `jobfiles` names a
job's files and sidecar; `dataset` writes ``metadata.jsonl``; `ledger` remembers
every place a run paid for jobs, so no other place pays again; `remote` runs a job's
output on object storage through `storage` (one `Bucket` interface, S3 and GCS).
"""
