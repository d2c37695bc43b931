# Run: python examples/django_service.py   (it serves on $PORT, 8001 by default; then: curl
# localhost:8001/work, or start examples/fastapi_service.py too, so the call to A answers)
# Needs: pip install 'laminar-middleware[django,requests]'
"""Service D: a one-file Django project with the Laminar middleware, calling service A.

`"laminar_middleware.django.LaminarMiddleware"` first in `MIDDLEWARE` is the server's whole
set-up: each request gets a SERVER span named by Django's route (`GET work`), child of the
caller's span when the request carries `X-Laminar-Span-Context`. `instrument_requests()`
covers every requests call, so the call to service A carries the header onward. In a real
project the settings below live in `settings.py`.
"""

from __future__ import annotations

import os
import sys

import requests
from django.http import HttpRequest, JsonResponse
from django.urls import path
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import instrument_requests

SERVICE_A_URL = os.environ.get("SERVICE_A_URL", "http://127.0.0.1:8000")
PORT = int(os.environ.get("PORT", "8001"))

SETTINGS = {
    "DEBUG": False,
    "SECRET_KEY": "example-only",
    "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
    "ROOT_URLCONF": __name__,
    "MIDDLEWARE": [
        "laminar_middleware.django.LaminarMiddleware",  # first, so its span covers the others
        "django.middleware.common.CommonMiddleware",
    ],
    "LAMINAR_MIDDLEWARE": {"excluded_paths": ["/health"]},
}


def work(request: HttpRequest) -> JsonResponse:
    try:
        greeting = requests.get(f"{SERVICE_A_URL}/hello", timeout=5).json()
    except requests.RequestException as exc:
        greeting = {"error": f"service A is not reachable: {type(exc).__name__}"}
    return JsonResponse({"done": True, "service_a": greeting})


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [path("work", work), path("health", health)]


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "service-d"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    from django.conf import settings
    from django.core.management import execute_from_command_line

    setup_tracing()
    instrument_requests()
    settings.configure(**SETTINGS)
    # Django's development server; under gunicorn or uvicorn the middleware is the same.
    execute_from_command_line([sys.argv[0], "runserver", f"127.0.0.1:{PORT}", "--noreload"])


if __name__ == "__main__":
    main()
