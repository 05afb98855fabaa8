"""Sans-IO protocol code: bytes in, events or decisions out. No asyncio, socket or network imports here."""
