"""Running a manifest: the loop, what each job goes through, and what the user sees meanwhile.

`runner.run_manifest` opens the run (`opening`: the endpoint — RunComfy, or a rehearsal's
in-process API given by the caller, the engine never imports the sandbox — the journal
and one lane per account, `lanes`), plans each job (`steps`) and feeds jobs to workers.
One job's life is a module a step: `submit`, `poll`, `finish` (download and sidecar),
`cancel` (which also holds ``batcher cancel``), all over what the workers share
(`shared`), with the run's reasons to stop in `stopping`; `options` is everything a run
can be told; `progress` is the live display; `scheduler` reads a cluster's shard.
"""
