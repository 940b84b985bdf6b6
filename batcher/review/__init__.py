"""A person's verdict on a run's images: the review page, its decisions, and the jobs that replace rejects.

`server` serves the page (`page`) on loopback with its input thumbnails
(`thumbnails`); `decisions` is the journal of accepted and rejected images;
`replacements` turns rejected images into the new jobs ``run --replace-rejected`` pays for.
"""
