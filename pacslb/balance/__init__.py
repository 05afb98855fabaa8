"""Pure decision code: which node gets a new connection. No I/O, no asyncio, no clocks of its own."""
