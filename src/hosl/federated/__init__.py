"""Many clients sharing one client model: data partitions, update records and their log, and the
schedules that decide which client steps when (see docs/many_clients.md)."""
