"""Built-in plugins, one folder per method. Each registers itself through the plugin host
exactly as a third-party plugin would (see editkit/host.py: BUILTIN_PLUGINS)."""
