"""``python -m unison.worker``: the process a local backend starts (see :func:`unison.worker.serve.main`)."""

from unison.worker.serve import main

main()
