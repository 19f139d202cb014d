"""The read API over the record (SPEC §6): ``create_app`` builds the FastAPI app that
``harmont-exec serve`` runs. This package re-exports the public names and holds no logic."""

from executor.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
