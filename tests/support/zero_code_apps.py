"""Two unmodified services for the zero-code tests: no line of laminar_middleware in them.

A (FastAPI): GET /a calls B's /b with plain httpx; GET /leaf answers.
B (Flask):   GET /b calls A's /leaf with plain requests.
"""

from __future__ import annotations

import os

import httpx
import requests
from fastapi import FastAPI
from flask import Flask

a_app = FastAPI()
b_app = Flask("b")


@a_app.get("/a")
def a_route() -> dict[str, object]:
    answer = httpx.get(f"{os.environ['B_URL']}/b", timeout=10)
    return {"b": answer.json()}


@a_app.get("/leaf")
def a_leaf() -> dict[str, str]:
    return {"leaf": "ok"}


@a_app.get("/health")
def a_health() -> dict[str, str]:
    return {"status": "ok"}


@b_app.get("/b")
def b_route() -> dict[str, object]:
    answer = requests.get(f"{os.environ['A_URL']}/leaf", timeout=10)
    return {"leaf": answer.json()}
