"""Running a manifest: the loop, what each job goes through, and what the user sees meanwhile.

`runner.run_manifest` opens the endpoint (`endpoint`: RunComfy, or a rehearsal's
in-process API given by the caller — the engine never imports the sandbox), the
journal and one lane per account (`lanes`), then feeds jobs to workers; `steps` is
one job's life (submit, poll, download, cancel); `options` is everything a run can be
told; `progress` is the live display; `scheduler` reads a cluster's shard.
"""
