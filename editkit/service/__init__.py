"""The HTTP service (see editkit.service.app)."""

from .app import create_app, is_loopback, serve
from .config import ApiError, ServiceConfig
from .state import model_label

__all__ = ["ApiError", "ServiceConfig", "create_app", "is_loopback", "model_label", "serve"]
