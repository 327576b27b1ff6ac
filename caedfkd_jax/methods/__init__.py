"""The DFKD methods, one file each behind one seam (`base.Method`); `registry` finds them.

  base.py       what a method declares to the engine, and the Setup, Phase and state it uses
  registry.py   `--config.method=NAME` -> the method (`registry.names()` lists them)
  bank_kd.py    KD from a bank of synthetic images: the unit the bank-based methods share
  NAME.py       one method each: nayer, cae_dfkd (the paper's), cae_dfkd_cmi, cmi, cpsc_dfkd,
                diffdfkd (docs/methods.md)
"""
