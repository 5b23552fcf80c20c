"""Serve entry point: `serve run serve/config.yaml`, or `serve run serve.app:app_builder` from the repo root.

The builder lives in the installed package (`diffembed.serving.app`) so Serve's controller can import it from
any working directory; this file re-exports it for `import_path: serve.app:app_builder`.
"""

from diffembed.serving.app import app_builder, build_app
from diffembed.serving.config import ServeArgs

__all__ = ["ServeArgs", "app_builder", "build_app"]
