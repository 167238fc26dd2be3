"""An AUTOMATIC1111-compatible HTTP API and a web page for sd-pipeline's Stable Diffusion."""

from sd_server._version import __version__
from sd_server.app import ServerConfig, create_app
from sd_server.models import Catalog, Checkpoint

__all__ = ["Catalog", "Checkpoint", "ServerConfig", "__version__", "create_app"]
