"""The training commands (`graftlm train <arch>`): `common` holds what they share (options, optimizer, launch checks,
the whole trained model, export with its card), `data` what they read (texts, token windows, records of text
columns), and one module per architecture (`dfa`, `bsbr`, `bridge`, `scaffold`) its `add_arguments(parser)` and
`main(args)`. `graftlm/train_<arch>.py` keeps the module paths `python -m graftlm.train_<arch>` runs."""
