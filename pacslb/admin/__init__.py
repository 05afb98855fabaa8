"""Operations: the admin API, the dashboard, Prometheus metrics, alerts, systemd notification, and the
admin states an operator sets (drain, halt, weights).

Everything here runs in pacslb's own event loop, beside the services, and reads the engine's state when
asked (a status request, a scrape, a sample every few seconds). Nothing here is called per connection:
the data path never waits on, or does work for, this package.
"""
