"""``python -m msa_memory.cli``: the ``msa`` command group."""

from msa_memory.cli.main import main

main()
