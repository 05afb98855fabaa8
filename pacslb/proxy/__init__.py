"""asyncio drivers: listeners, the relay, and the services that carry out decisions."""
