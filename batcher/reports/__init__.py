"""What a person reads after a run: the summary, status and plan, the gallery, exports, a notification.

`report` (summary, `status`, `plan`), `gallery` (``index.html``), `export` (the
images as a dataset in WebDataset, Parquet or Hugging Face form), `notify` (one POST
when a run ends).
"""
