"""Offline tools that make retrieval heads; the runtime never imports them.

* :mod:`specontext.tools.distill` (``specontext-distill``): train a head so that its per-KV-head
  attention matches the target model's, from text and generated retrieval tasks.
* :mod:`specontext.tools.eagle3` (``specontext-import-eagle3``): prune an EAGLE-3 draft
  checkpoint to a head.

Both write the artefact :func:`specontext.retrieval.head.save_head` writes and
:func:`specontext.retrieval.head.load_head` reads; that file format is the only thing the runtime
and these tools share.
"""
