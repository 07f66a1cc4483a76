"""The commands: each parses its options, calls one function of `sw_lens`, prints what it
measured and saves its document. Run as ``python experiments/<name>.py`` or
``python -m experiments.<name>``."""
