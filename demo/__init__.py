"""The demo world, a plug-in of the pipeline: captioned coloured shapes (world.py), served as a web
site over loopback HTTP (site.py), judged by a pixel-level detector (detect.py) for the gallery's
zero-shot evaluation (evaluation.py), and `dalle demo` (run.py). Nothing in dalle/ or flows/
imports it; deleting this folder leaves the pipeline whole."""
