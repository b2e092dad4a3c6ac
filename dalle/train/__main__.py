"""`python -m dalle.train MODEL --out ROOT`: the entry point torchrun starts on every process."""

from dalle.train.launch import main

main()
