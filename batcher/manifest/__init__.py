"""From a YAML manifest to validated jobs: nothing here talks to the network but `preflight`.

`load_manifest` (in `loader`) is the one way in; it reads the YAML safely (`yamlread`),
checks each entry (`entries`), expands matrices, repeats and prompt files (`expand`,
`template`, `promptfile`) into `Job`s with content identities (`job`), checks local
reference images where the manifest lives (`localimages`, `folder`) and validates each
input against the model's schema (`schema`), gathering every problem once (`problems`).
`payload` builds what a job sends; `cost` estimates prices; `preflight` asks whether
RunComfy could fetch the input URLs.
"""

from .job import Job
from .loader import Manifest, load_manifest

__all__ = ["Job", "Manifest", "load_manifest"]
