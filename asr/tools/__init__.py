"""The roof: every `python -m asr.tools.<tool>` entry point and its `main()`, on one command grammar (`cli`).
Nothing below imports from here; train.py, evaluate.py and transcribe.py at the top of the checkout sit beside it."""
