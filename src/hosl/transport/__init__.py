"""How the client reaches the server: one interface, in-process and network implementations."""
