"""Where shared state lives: persistence tables now, admin states later. See store.py."""
