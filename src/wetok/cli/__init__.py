"""The ``wetok`` command; each subcommand lives in its own module here."""
