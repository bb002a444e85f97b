"""The two sides of the split: what each owns and does in one step. No I/O here."""

from hosl.parties.client import ClientParty
from hosl.parties.server import ServerParty

__all__ = ["ClientParty", "ServerParty"]
