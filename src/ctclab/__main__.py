"""`python -m ctclab` is the `ctclab` command."""
from .cli import main

main()
