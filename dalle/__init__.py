"""DALL·E end to end: the library behind the pipeline's flows and command line."""

import os

# albumentations (imported by img2dataset) checks PyPI for updates on import unless told
# not to; a crawler must not make network calls nobody asked for.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
