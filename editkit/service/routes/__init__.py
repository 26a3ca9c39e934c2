"""The service's routers, one per resource; each is built for an app's capped bodies."""
