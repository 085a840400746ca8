"""Command line: ``msa-encode`` (the hot path) and the ``msa`` command group.

One module per command group, all on the groups and helpers of :mod:`msa_memory.cli.common`
(shared options, error handling, JSON output, exit codes):

- :mod:`msa_memory.cli.encode`: ``msa-encode`` / ``msa encode``
- :mod:`msa_memory.cli.store`: ``msa store info|versions|docs|verify|compact|gc|tag|restore|repair|reindex-lexical``
- :mod:`msa_memory.cli.ask`: ``msa ask`` and ``msa search`` (they load a model)
- :mod:`msa_memory.cli.router`: ``msa train-router`` and ``msa store reindex-router``
- :mod:`msa_memory.cli.main`: the console entry points
"""

from msa_memory.cli.common import EXIT_CODES
from msa_memory.cli.main import app, encode_app, encode_main, main

__all__ = ["app", "encode_app", "main", "encode_main", "EXIT_CODES"]
