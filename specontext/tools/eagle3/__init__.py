"""``specontext-import-eagle3``: an EAGLE-3 draft checkpoint as a retrieval head (see convert.py)."""
