"""``python -m mpo`` (what ``accelerate launch -m mpo ...`` runs)."""

from mpo.cli import app

app()
