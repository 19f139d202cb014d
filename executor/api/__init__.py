"""The API over the record (SPEC §6): ``create_app`` builds the FastAPI app that
``harmont-exec serve`` runs, under ``API_PREFIX``. This package re-exports the public names and
holds no logic: ``app`` assembles, ``routes/`` has one router per resource, ``deps`` the route
dependencies, ``lookup`` the tenancy rule, ``pagination``, ``wire`` and ``errors`` the wire
format, ``body`` the write routes' request bodies, ``service`` the build service's Protocol,
``live`` the live log protocol, ``middleware`` what wraps every route."""

from executor.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
